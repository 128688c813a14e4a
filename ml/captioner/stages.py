"""The paper's three captioner stages and the image-to-caption path used after training.

base: pretrained on the raw pairs' alt-text; ssc: fine-tuned from base on short captions of
the main subject; dsc: fine-tuned from base on long descriptive captions (DALL·E 3, 2.1).
The CLIP stays frozen throughout: its features are computed once per image.
"""

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import open_clip
import torch
from PIL import Image

from ml.captioner.evaluate import evaluate_dsc, evaluate_ssc
from ml.captioner.features import clip_features, encode_with_tokens
from ml.captioner.generate import generate_captions
from ml.captioner.model import Captioner, CaptionerConfig
from ml.captioner.tokenizer import train_tokenizer
from ml.captioner.train import train_captioner
from ml.clip import Preprocess, load_clip
from ml.data.sample import Sample
from ml.data.shapeworld import scene_of
from ml.train import TrainConfig

STAGES = ("base", "ssc", "dsc")
CAPTION_FIELDS = {"ssc": "short_caption", "dsc": "descriptive_caption"}


@dataclass
class CaptionerStageConfig:
    """One stage's training; `model` and `vocab_size` only shape the base (fine-tunes inherit)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: CaptionerConfig = field(default_factory=CaptionerConfig)
    vocab_size: int = 512
    max_new_tokens: int = 80
    patch_tokens: bool = True  # also condition on the CLIP's grid of image tokens


def stage_captions(stage: str, samples: Sequence[Sample]) -> list[str]:
    """The training targets of a stage: alt-text for base, ground-truth captions otherwise."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "base":
        return [s.text for s in samples]
    missing = [s.key for s in samples if CAPTION_FIELDS[stage] not in s.meta]
    if missing:
        raise ValueError(
            f"{len(missing)} samples lack '{CAPTION_FIELDS[stage]}', e.g. {missing[0]}"
        )
    return [s.meta[CAPTION_FIELDS[stage]] for s in samples]


def fit_to_clip(
    model_cfg: CaptionerConfig, clip: open_clip.CLIP, preprocess: Preprocess, patch_tokens: bool
) -> CaptionerConfig:
    """The captioner's input widths, read off the CLIP itself, whatever its architecture."""
    with torch.no_grad():
        pooled, tokens = encode_with_tokens(clip, preprocess(Image.new("RGB", (32, 32)))[None])
    if not patch_tokens:
        return replace(model_cfg, clip_dim=pooled.shape[1], token_grid=0, token_dim=0)
    _, token_dim, grid, _ = tokens.shape
    return replace(model_cfg, clip_dim=pooled.shape[1], token_grid=grid, token_dim=token_dim)


def train_stage(
    stage: str,
    cfg: CaptionerStageConfig,
    clip_dir: Path,
    samples: Sequence[Sample],
    base: Captioner | None = None,
    tokenizer_corpus: Sequence[str] = (),
    log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
) -> Captioner:
    """Train one stage on `samples`: base from scratch, ssc/dsc continuing from a copy of base."""
    captions = stage_captions(stage, samples)
    clip, preprocess, _ = load_clip(clip_dir)
    if stage == "base":
        model_cfg = fit_to_clip(cfg.model, clip, preprocess, cfg.patch_tokens)
        tokenizer = train_tokenizer([*captions, *tokenizer_corpus], cfg.vocab_size)
        torch.manual_seed(cfg.train.seed)
        model = Captioner(model_cfg, tokenizer)
    else:
        if base is None:
            raise ValueError(f"stage {stage!r} fine-tunes the base captioner: pass `base`")
        model = copy.deepcopy(base)
    images = [s.image for s in samples]
    features = clip_features(clip, preprocess, images, model.config.token_grid > 0)
    train_captioner(model, features, captions, cfg.train, log)
    return model


class ImageCaptioner:
    """Images in, captions out: the frozen CLIP's features, then batched greedy decoding."""

    def __init__(self, clip_dir: Path, captioner_dir: Path, max_new_tokens: int = 80) -> None:
        self.clip, self.preprocess, _ = load_clip(clip_dir)
        self.model = Captioner.from_pretrained(captioner_dir)
        self.max_new_tokens = max_new_tokens

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        patch_tokens = self.model.config.token_grid > 0
        features = clip_features(self.clip, self.preprocess, images, patch_tokens)
        return generate_captions(self.model, features, self.max_new_tokens)


def evaluate(captions: Sequence[str], samples: Sequence[Sample]) -> dict[str, float]:
    """Captions against ShapeWorld's scene graphs: DSC attribute recall/precision and SSC
    main-object accuracy (each stage is scored on both, so the fine-tunes' effect shows).

    Data without scene graphs (a webdataset source) has no ground truth to score against:
    only the caption length is reported.
    """
    metrics = {"mean_words": sum(len(c.split()) for c in captions) / max(1, len(captions))}
    scenes = [scene_of(s) for s in samples]
    if None in scenes:
        return metrics
    dsc = evaluate_dsc(captions, scenes)
    return {
        "attribute_recall": dsc["recall"],
        "attribute_precision": dsc["precision"],
        **evaluate_ssc(captions, scenes),
        **metrics,
    }
