"""The paper's caption ablations (DALL·E 3 sections 3.3-3.4, Figures 4 and 5): the variants,
what one variant trains, and how each of its checkpoints is scored.

Every variant trains the same model from the same seed on the same images; only the blend of
captions differs. Each checkpoint is scored with `clip_s_eval`'s instruments: CLIP-S of images
drawn from the eval split's alt-text against that alt-text and of images drawn from its
descriptive captions against those (the paper's two panels), and the oracle's GenEval-style
verdicts on the held-out prompts asked in the descriptive style.
"""

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml.data.mixed import MixConfig
from ml.diffusion.config import DiffusionConfig
from ml.eval.config import ClipSEvalConfig

# variant -> (synthetic caption type, share of synthetic captions in the blend)
VARIANTS: dict[str, tuple[str, float]] = {
    "alt": ("alt", 0.0),
    "ssc95": ("ssc", 0.95),
    "dsc65": ("dsc", 0.65),
    "dsc80": ("dsc", 0.80),
    "dsc90": ("dsc", 0.90),
    "dsc95": ("dsc", 0.95),
}
CLIP_S_SETTINGS = ("alt", "descriptive")  # the captions images are drawn from and scored against
SEED_SEPARATOR = "-seed"


def _ablation_model() -> DiffusionConfig:
    model = DiffusionConfig()
    model.train.steps = 2000
    return model


@dataclass
class AblationConfig:
    """The `ablation_model` stage: which variants and seeds train (its partitions), at how many
    evenly spaced steps each is scored, the one model every variant trains, and the scoring."""

    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0, 1)
    eval_points: int = 4  # scored at steps/eval_points, 2 steps/eval_points, ..., steps
    model: DiffusionConfig = field(default_factory=_ablation_model)
    eval: ClipSEvalConfig = field(
        default_factory=lambda: ClipSEvalConfig(images_per_prompt=2, captions=128)
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or not self.variants:
            raise ValueError(f"variants must be some of {list(VARIANTS)}, got {unknown or []}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        if not 1 <= self.eval_points <= self.model.train.steps:
            raise ValueError(
                f"eval_points must be in [1, model.train.steps={self.model.train.steps}], "
                f"got {self.eval_points}"
            )


def partition_keys(cfg: AblationConfig) -> list[str]:
    """`<variant>-seed<seed>`: one training run each."""
    return [f"{v}{SEED_SEPARATOR}{s}" for v in cfg.variants for s in cfg.seeds]


@dataclass
class VariantRun:
    """What one partition trains: its variant's blend and the model. Two partitions of one seed
    differ in `variant` and `blend` only."""

    variant: str
    blend: MixConfig
    model: DiffusionConfig


def variant_run(cfg: AblationConfig, key: str) -> VariantRun:
    """The training run of partition `key`; a key the config does not list is named."""
    if key not in partition_keys(cfg):
        raise ValueError(f"no ablation partition {key!r} in this config: {partition_keys(cfg)}")
    variant, _, seed = key.rpartition(SEED_SEPARATOR)
    caption_type, ratio = VARIANTS[variant]
    model = copy.deepcopy(cfg.model)
    model.train.seed = int(seed)
    return VariantRun(variant, MixConfig(caption_type, ratio, int(seed)), model)


def eval_steps(cfg: AblationConfig) -> list[int]:
    """The steps whose checkpoints are kept and scored, the last one the end of training."""
    steps = cfg.model.train.steps
    return sorted({round(steps * k / cfg.eval_points) for k in range(1, cfg.eval_points + 1)})


@dataclass
class EvalSet:
    """What every checkpoint of every variant is drawn from and scored against."""

    captions: dict[str, list[str]]  # CLIP-S setting -> eval-split captions
    prompts: list[dict[str, Any]]  # held-out prompts, each repeated images_per_prompt times
    texts: list[str]  # those prompts in the descriptive style


def eval_set(raw: Path, cfg: ClipSEvalConfig) -> EvalSet:
    from ml.eval.oracle import descriptive_prompt
    from ml.stages.clip_s_eval import clip_s_captions

    prompts_file = raw / "prompts.json"
    prompts = json.loads(prompts_file.read_text()) if prompts_file.is_file() else []
    repeated = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    texts = [descriptive_prompt(p, cfg.seed) for p in repeated]
    return EvalSet(clip_s_captions(raw, cfg.captions), repeated, texts)


def score_checkpoint(
    pipe: Any, clip: tuple[Any, Any, Any], evals: EvalSet, cfg: ClipSEvalConfig
) -> dict[str, Any]:
    """One checkpoint's raw scores, kept so seeds can be pooled: the per-pair CLIP-S (paper's
    variant) of each setting, and the oracle's verdict on each prompt image by category."""
    from ml.eval.clip_score import clip_score
    from ml.eval.oracle import verdicts_by_category
    from ml.stages.clip_s_eval import sample

    scores: dict[str, Any] = {"clip_s": {}, "verdicts": {}}
    for setting, captions in evals.captions.items():
        if captions:
            images = sample(pipe, captions, cfg.teacher_steps, cfg)
            scores["clip_s"][setting] = clip_score(*clip, images, captions, "paper").per_pair
    if evals.prompts:
        images = sample(pipe, evals.texts, cfg.teacher_steps, cfg)
        scores["verdicts"] = verdicts_by_category(images, evals.prompts)
    return scores


def summary(scores: dict[str, Any]) -> dict[str, float]:
    """The figures of one checkpoint's raw scores: mean CLIP-S per setting, the share of
    prompt images followed per category and GenEval's overall (their mean)."""
    from ml.eval.oracle import category_scores

    out = {f"clip_s_{s}": sum(v) / len(v) for s, v in scores["clip_s"].items() if v}
    if scores["verdicts"]:
        by_category = category_scores(scores["verdicts"])
        out |= {k: v for k, v in by_category.items() if k.endswith("_accuracy")}
    return out
