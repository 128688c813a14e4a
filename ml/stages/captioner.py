"""`captioner_base`, `captioner_ssc`, `captioner_dsc`: the paper's three captioner trainings.

base: pretrained on the raw pairs' alt-text; ssc: fine-tuned from base on short captions of
the main subject; dsc: fine-tuned from base on long descriptive captions (DALL·E 3, 2.1).
The CLIP stays frozen throughout: its features are computed once per image.

    python -m ml.stages.captioner --stage captioner_dsc --config c.yaml --out DIR
"""

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from ml.captioner.config import CaptionerConfig, CaptionerStageConfig
from ml.data.sample import Sample
from ml.stage import Inputs, Log, Stage, StageResult, main

KINDS = ("base", "ssc", "dsc")
CAPTION_FIELDS = {"ssc": "short_caption", "dsc": "descriptive_caption"}
TRAIN_SPLIT = {"base": "train", "ssc": "labelled", "dsc": "labelled"}
PREVIEW = 12


def stage_captions(kind: str, samples: Sequence[Sample]) -> list[str]:
    """The training targets of a stage: alt-text for base, ground-truth captions otherwise."""
    if kind not in KINDS:
        raise ValueError(f"stage must be one of {KINDS}, got {kind!r}")
    if kind == "base":
        return [s.text for s in samples]
    missing = [s.key for s in samples if CAPTION_FIELDS[kind] not in s.meta]
    if missing:
        raise ValueError(f"{len(missing)} samples lack '{CAPTION_FIELDS[kind]}', e.g. {missing[0]}")
    return [s.meta[CAPTION_FIELDS[kind]] for s in samples]


def fit_to_clip(
    model_cfg: CaptionerConfig, clip: Any, preprocess: Callable, patch_tokens: bool
) -> CaptionerConfig:
    """The captioner's input widths, read off the CLIP itself, whatever its architecture."""
    import torch
    from PIL import Image

    from ml.captioner.features import encode_with_tokens

    with torch.no_grad():
        pooled, tokens = encode_with_tokens(clip, preprocess(Image.new("RGB", (32, 32)))[None])
    if not patch_tokens:
        return replace(model_cfg, clip_dim=pooled.shape[1], token_grid=0, token_dim=0)
    _, token_dim, grid, _ = tokens.shape
    return replace(model_cfg, clip_dim=pooled.shape[1], token_grid=grid, token_dim=token_dim)


def run(kind: str, cfg: CaptionerStageConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    """Train one captioner (base from scratch, ssc/dsc from a copy of base) and caption the
    held-out images with it, loaded the way users load it."""
    import copy

    import torch

    from ml.captioner.features import clip_features
    from ml.captioner.generate import ImageCaptioner
    from ml.captioner.model import Captioner
    from ml.captioner.train import train_captioner
    from ml.clip import load_clip
    from ml.data.raw_pairs import load_split
    from ml.eval.captions import evaluate_captions
    from ml.tokenizer import train_tokenizer
    from ml.viz import image_grid

    raw, clip_dir = inputs["raw_pairs"], inputs["clip_encoder"]
    samples = load_split(raw, TRAIN_SPLIT[kind])
    captions = stage_captions(kind, samples)
    clip, preprocess, _ = load_clip(clip_dir)
    if kind == "base":
        # The vocabulary also covers the fine-tuning captions, which the fine-tunes inherit.
        corpus = list(captions)
        if (raw / "labelled").is_dir():
            labelled = load_split(raw, "labelled")
            corpus += stage_captions("ssc", labelled) + stage_captions("dsc", labelled)
        tokenizer = train_tokenizer(corpus, cfg.vocab_size)
        torch.manual_seed(cfg.train.seed)
        model = Captioner(fit_to_clip(cfg.model, clip, preprocess, cfg.patch_tokens), tokenizer)
    else:
        model = copy.deepcopy(Captioner.from_pretrained(inputs["captioner_base"]))
    features = clip_features(
        clip, preprocess, [s.image for s in samples], model.config.token_grid > 0
    )
    log.info(
        f"captioner_{kind}: {cfg.train.steps} steps on {len(samples)} {TRAIN_SPLIT[kind]} samples"
    )
    trained = train_captioner(
        model, features, captions, cfg.train, log, inputs.checkpoints(cfg), inputs.resume
    )
    model.save_pretrained(out)
    held_out = load_split(raw, "eval")
    generated = ImageCaptioner(clip_dir, out, cfg.max_new_tokens)([s.image for s in held_out])
    examples = [(s.image, c) for s, c in zip(held_out[:PREVIEW], generated, strict=False)]
    return StageResult(
        metrics=evaluate_captions(generated, held_out),
        metadata={"train_samples": len(samples), "train_seconds": round(trained.seconds, 1)},
        images={"samples": image_grid([image for image, _ in examples], scale=4)},
        examples=examples,
        files={"eval_captions.json": dict(zip((s.key for s in held_out), generated, strict=True))},
        curves={"loss": trained.curve},
        register=True,
    )


def _stage(kind: str) -> Stage:
    inputs = ("raw_pairs", "clip_encoder") + (() if kind == "base" else ("captioner_base",))
    name = f"captioner_{kind}"
    return Stage(name, CaptionerStageConfig, inputs, partial(run, kind), trains=True)


BASE, SSC, DSC = (_stage(kind) for kind in KINDS)

if __name__ == "__main__":
    main([BASE, SSC, DSC])
