"""The training loop's cost on the toy CLIP and the DSC captioner, each comparison in this run.

    python bench/bench_train.py [--steps 30] [--rounds 2] [--threads 1]

For each model, steps per second of
1. a bare PyTorch loop: one fixed batch, padded to the full length, forward, backward, AdamW;
2. the bare loop on length-cut text (CLIP: `ContrastiveLoss`'s chunks; captioner:
   length-sorted micro-batches), the same gradient with less padding;
3. our loop (`ml.train.train`: fresh batches from the stage's sampler, fused AdamW, clipping,
   logging), as the stage runs it.
Rounds alternate, so a busy machine slows all alike; the best round counts.
"""

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from ml.captioner.config import CaptionerConfig, CaptionerStageConfig
from ml.captioner.features import clip_features
from ml.captioner.model import Captioner
from ml.captioner.train import (
    caption_loss,
    make_batch,
    micro_batch_loss,
    micro_batches,
    train_captioner,
)
from ml.clip import ContrastiveLoss, build_toy_clip, clip_batch, toy_transforms, train_toy_clip
from ml.clip_config import ClipConfig
from ml.data.shapeworld import ShapeWorldConfig, generate, scene_of
from ml.speed_probe import describe, probe
from ml.stages.captioner import fit_to_clip
from ml.tokenizer import train_tokenizer


def steps_per_s(step: Callable[[], torch.Tensor], steps: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def bare(model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> torch.Tensor:
        value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    return step


def clip_rows(args: argparse.Namespace) -> dict[str, float]:
    cfg = ClipConfig()
    samples = list(generate(1024, 0, ShapeWorldConfig(), "clip"))
    preprocess, tokenizer = toy_transforms(cfg)
    images = torch.stack([preprocess(s.image) for s in samples])
    scenes = [scene_of(s) for s in samples]
    index = list(range(cfg.train.batch_size))
    pixels, token_ids = clip_batch(
        images, scenes, [""] * len(samples), tokenizer, cfg, index, torch.Generator()
    )
    model = build_toy_clip(cfg)

    def padded() -> torch.Tensor:
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(token_ids, normalize=True)
        n = len(pixels)
        logits = model.logit_scale.exp() * image @ text.T
        labels = torch.arange(n)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :n].T, labels)) / 2

    cut = ContrastiveLoss(model)
    runs = {
        "bare, padded to 64": bare(model, padded),
        "bare, length-cut": bare(model, lambda: cut(pixels, token_ids)),
    }
    results = {name: steps_per_s(step, args.steps) for name, step in runs.items()}
    train = replace(cfg.train, steps=args.steps + 1, log_every=10)
    start = time.perf_counter()
    train_toy_clip(samples, replace(cfg, train=train))
    results["our loop"] = (args.steps + 1) / (time.perf_counter() - start)
    return results


def captioner_rows(args: argparse.Namespace) -> dict[str, float]:
    clip_cfg = ClipConfig()
    clip, preprocess = build_toy_clip(clip_cfg), toy_transforms(clip_cfg)[0]
    labelled = list(generate(512, 0, ShapeWorldConfig(), "labelled"))
    captions = [s.meta["descriptive_caption"] for s in labelled]
    stage = CaptionerStageConfig()
    config = fit_to_clip(CaptionerConfig(), clip, preprocess, patch_tokens=True)
    features = clip_features(clip, preprocess, [s.image for s in labelled])
    model = Captioner(config, train_tokenizer(captions))
    n = stage.train.batch_size
    whole = make_batch(model, features[:n], captions[:n])
    pieces = micro_batches(model, features[:n], captions[:n], 4)
    padding = 1 - sum(int(p.attention_mask.sum()) for p in pieces) / whole.attention_mask.numel()
    print(f"captioner: {padding:.0%} of a padded batch's caption positions are padding")
    runs = {
        "bare, padded to the longest": bare(model, lambda: caption_loss(model, whole)),
        "bare, length-sorted micro-batches": bare(model, lambda: micro_batch_loss(model, pieces)),
    }
    results = {name: steps_per_s(step, args.steps) for name, step in runs.items()}
    train = replace(stage.train, steps=args.steps + 1)
    start = time.perf_counter()
    train_captioner(model, features, captions, train)
    results["our loop"] = (args.steps + 1) / (time.perf_counter() - start)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe(probe()))
    print(f"{args.steps} steps x {args.rounds} rounds")
    for name, measure in (("toy CLIP", clip_rows), ("DSC captioner", captioner_rows)):
        rounds = [measure(args) for _ in range(args.rounds)]
        best = {key: max(r[key] for r in rounds) for key in rounds[0]}
        first = next(iter(best.values()))
        for key, value in best.items():
            print(f"{name:14} {key:36} {value:6.2f} steps/s  ({value / first:.2f}x bare padded)")


if __name__ == "__main__":
    main()
