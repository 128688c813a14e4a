"""The prompt-following instrument measured before it is trusted: accuracy on renders drawn as a
person would still read them, and false positives on blank, noise and mismatched images.

    python bench/bench_oracle.py [--per-category 128] [--model assets/diffusion_model]

(i) The held-out prompts' target scenes (`shapeworld.eval_prompts`, seed 1) rendered clean,
    with each perturbation of `ml.eval.perturb.Perturbation` alone, and with all of them
    (objects moved up to 3 px, scaled +-15%, blurred up to 1 px, reshaded +-15 a channel, noise
    sd 4): the share read as following their own prompt, per category, 95% Wilson intervals.
(ii) False positives on mismatched prompts: each image scored against another prompt of its
    category that its target scene does not follow (`perturb.mismatched`), on perturbed
    renders and, with `--model`, on the model's samples of the descriptive prompts (beside
    them, the model's accuracy on its own prompts).
(iii) False positives on images that show nothing: blank backgrounds (every colour and
    texture), uniform noise, and Gaussian noise around each background, each scored against
    every prompt of each category.
Then the reader's images/s. Prints Markdown tables, with the speed probe first.
"""

import argparse
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ml.data.shapeworld import BACKGROUNDS, EVAL_CATEGORIES, TEXTURES, Scene, eval_prompts, render
from ml.eval.oracle import descriptive_prompt, follows, in_batches, wilson
from ml.eval.perturb import Perturbation, mismatched, perturbed_render
from ml.eval.scene_reader import read_scene
from ml.speed_probe import describe, probe

NONE = Perturbation(shift=0, scale=0, blur=0, colour=0, noise=0)
CASES = {
    "clean": NONE,
    "shift <= 3 px": replace(NONE, shift=3),
    "scale +-15%": replace(NONE, scale=0.15),
    "blur <= 1 px": replace(NONE, blur=1),
    "colour +-15": replace(NONE, colour=15),
    "noise sd 4": replace(NONE, noise=4),
    "**all of them**": Perturbation(),
}


def cell(hits: Sequence[bool]) -> str:
    low, high = wilson(sum(hits), len(hits))
    return f"{sum(hits) / len(hits):.3f} [{low:.2f}, {high:.2f}]"


def table(title: str, rows: dict[str, dict[str, list[bool]]]) -> None:
    """One row per case: each category's share of verdicts that hold, with its interval."""
    print(f"\n| {title} | " + " | ".join(EVAL_CATEGORIES) + " |")
    print("|---" * (len(EVAL_CATEGORIES) + 1) + "|")
    for name, hits in rows.items():
        print(f"| {name} | " + " | ".join(cell(hits[c]) for c in EVAL_CATEGORIES) + " |")


def verdicts(images: Sequence[Image.Image], asked: Sequence[dict[str, Any]]) -> dict:
    """Whether each image follows the prompt asked of it, by that prompt's category."""
    out: dict[str, list[bool]] = {c: [] for c in EVAL_CATEGORIES}
    for image, prompt in zip(images, asked, strict=True):
        out[prompt["category"]].append(follows(read_scene(image), prompt["asks"]))
    return out


def blank_and_noise(size: int, n: int) -> dict[str, list[Image.Image]]:
    rng = np.random.default_rng(0)
    blank = [render(Scene(bg, texture, ()), size) for bg in BACKGROUNDS for texture in TEXTURES]
    uniform = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    around = [
        np.clip(rng.normal(BACKGROUNDS[bg], 30, (size, size, 3)), 0, 255).astype(np.uint8)
        for bg in BACKGROUNDS for _ in range(n // len(BACKGROUNDS))
    ]  # fmt: skip
    return {
        "blank backgrounds": blank,
        "uniform noise": [Image.fromarray(a) for a in uniform],
        "noise sd 30 on a background": [Image.fromarray(a) for a in around],
    }


def against_every_prompt(images: list[Image.Image], prompts: list[dict]) -> dict:
    """Each image's reading held to every prompt."""
    readings = [read_scene(image) for image in images]
    out: dict[str, list[bool]] = {c: [] for c in EVAL_CATEGORIES}
    for prompt in prompts:
        out[prompt["category"]] += [follows(r, prompt["asks"]) for r in readings]
    return out


def model_sampler(folder: Path, steps: int, guidance: float) -> Callable[[list[str]], list]:
    import torch

    from ml.diffusion.pipeline import TextToImagePipeline

    torch.set_num_threads(2)
    pipe = TextToImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return lambda texts: pipe(texts, steps, guidance, seed=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="the model's image size")
    parser.add_argument("--noise-images", type=int, default=64)
    parser.add_argument("--model", type=Path, help="a diffusion_model or distilled_model folder")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    print(describe(probe()))
    prompts = eval_prompts(1, args.per_category)
    scenes = [Scene.from_dict(p["scene"]) for p in prompts]
    print(f"{len(prompts)} held-out prompts, {args.per_category} per category, {args.size} px")

    rows = {}
    for name, perturbation in CASES.items():
        rng = random.Random(0)
        images = [perturbed_render(s, args.size, rng, perturbation) for s in scenes]
        rows[name] = verdicts(images, prompts)
    table("(i) renders read right", rows)

    rng = random.Random(1)
    drawn = [perturbed_render(s, args.size, rng) for s in scenes]
    rows = {"perturbed renders": verdicts(drawn, mismatched(prompts))}
    if args.model is not None:
        texts = [descriptive_prompt(p, 1) for p in prompts]
        samples = in_batches(model_sampler(args.model, args.steps, args.guidance), texts)
        rows[f"{args.model.name} samples"] = verdicts(samples, mismatched(prompts))
        table(f"{args.model.name} on its own prompts", {"accuracy": verdicts(samples, prompts)})
    table("(ii) false positives, mismatched prompts", rows)

    rows = {
        name: against_every_prompt(images, prompts)
        for name, images in blank_and_noise(args.size, args.noise_images).items()
    }
    table("(iii) false positives, nothing drawn", rows)

    renders = [render(s, args.size) for s in scenes]
    start = time.perf_counter()
    for image in renders:
        read_scene(image)
    speed = len(renders) / (time.perf_counter() - start)
    print(f"\nreader: {speed:.0f} images/s at {args.size} px")


if __name__ == "__main__":
    main()
