"""Recaptioning throughput: batched greedy decoding vs one image at a time, in the same run.

    python bench/bench_recaption.py [--captioner DIR --clip DIR] [--images 128] [--batch-size 64]

With no materialized captioner it builds a small one standalone: a freshly initialised toy
CLIP for features and a captioner trained for a few steps on ShapeWorld's descriptive
captions, so that it writes captions of realistic length (an untrained LM never stops).
Throughput is that of the captioner alone; the CLIP features are computed once, untimed.
"""

import argparse
import time
from collections.abc import Callable

import torch

from ml.captioner.config import CaptionerConfig
from ml.captioner.features import clip_features
from ml.captioner.generate import generate_captions
from ml.captioner.model import Captioner
from ml.captioner.train import train_captioner
from ml.clip import build_toy_clip, load_clip, toy_transforms
from ml.clip_config import ClipConfig
from ml.config import TrainConfig
from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.speed_probe import describe, probe
from ml.stages.captioner import fit_to_clip
from ml.tokenizer import train_tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captioner", help="a folder written by Captioner.save_pretrained")
    parser.add_argument("--clip", help="the CLIP folder the captioner was trained with")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--train-steps", type=int, default=60, help="for the standalone captioner")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if bool(args.captioner) != bool(args.clip):
        parser.error("--captioner and --clip go together: the features must come from its CLIP")
    return args


def standalone_captioner(
    config: CaptionerConfig, features: torch.Tensor, captions: list[str], steps: int
) -> Captioner:
    model = Captioner(config, train_tokenizer(captions))
    cfg = TrainConfig(steps=steps, batch_size=32, lr=2e-3, warmup_steps=10, log_every=steps)
    train_captioner(model, features, captions, cfg)
    return model


def timed(fn: Callable[[], list[str]]) -> tuple[list[str], float]:
    start = time.perf_counter()
    captions = fn()
    return captions, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe(probe()))
    if args.clip:
        clip, preprocess, _ = load_clip(args.clip)
        model = Captioner.from_pretrained(args.captioner)
    else:
        clip_cfg = ClipConfig()
        clip, preprocess = build_toy_clip(clip_cfg), toy_transforms(clip_cfg)[0]
        labelled = list(generate(1024, 0, ShapeWorldConfig(), "labelled"))
        config = fit_to_clip(CaptionerConfig(), clip, preprocess, patch_tokens=True)
        train_features = clip_features(clip, preprocess, [s.image for s in labelled])
        captions = [s.meta["descriptive_caption"] for s in labelled]
        model = standalone_captioner(config, train_features, captions, args.train_steps)
    samples = list(generate(args.images, 0, ShapeWorldConfig(), "eval"))
    patch_tokens = model.config.token_grid > 0
    features = clip_features(clip, preprocess, [s.image for s in samples], patch_tokens)
    generate_captions(model, features[:2], args.max_new_tokens)  # warm-up

    def batched() -> list[str]:
        return [
            caption
            for start in range(0, len(features), args.batch_size)
            for caption in generate_captions(
                model, features[start : start + args.batch_size], args.max_new_tokens
            )
        ]

    def one_by_one() -> list[str]:
        return [generate_captions(model, row[None], args.max_new_tokens)[0] for row in features]

    batched_captions, batched_s = timed(batched)
    single_captions, single_s = timed(one_by_one)
    n = len(features)
    words = sum(len(c.split()) for c in batched_captions) / n
    print(f"images: {n}, batch size: {args.batch_size}, threads: {torch.get_num_threads()}")
    print(f"mean caption length: {words:.1f} words; example: {batched_captions[0]!r}")
    print(f"batched:    {n / batched_s:8.1f} images/s ({batched_s:.2f} s)")
    print(f"one by one: {n / single_s:8.1f} images/s ({single_s:.2f} s)")
    print(f"speed-up:   {single_s / batched_s:8.1f}x")
    print(f"identical captions under greedy decoding: {batched_captions == single_captions}")


if __name__ == "__main__":
    main()
