"""The prompt-following oracle on ground-truth renders: exact, and how it degrades.

    python bench/bench_oracle.py [--per-category 32]

Scores the renders of the held-out prompts' target scenes (`shapeworld.eval_prompts`, seed 1)
per category at 16 and 32 px, clean and with Gaussian blur and pixel noise, the kinds of
damage a small generator does; then the reader's images/s. What a generated image scores is
bounded by what the reader gets right on damaged renders of the right scene.
"""

import argparse
import time

import numpy as np
from PIL import Image, ImageFilter

from ml.data.shapeworld import EVAL_CATEGORIES, Scene, eval_prompts, render
from ml.eval.oracle import score_by_category
from ml.eval.scene_reader import read_scene

DAMAGE = [(0.0, 0), (0.7, 0), (1.0, 0), (0.0, 12), (0.5, 0), (0.7, 8)]  # (blur radius, noise sd)


def damaged(image: Image.Image, blur: float, noise: float, rng: np.random.Generator) -> Image.Image:
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    if noise:
        pixels = np.asarray(image, dtype=np.float64)
        pixels = pixels + rng.normal(0, noise, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=32)
    args = parser.parse_args()
    prompts = eval_prompts(1, args.per_category)
    print(f"{len(prompts)} prompts, {args.per_category} per category, one render each")
    print("| px | blur | noise | " + " | ".join(EVAL_CATEGORIES) + " | overall |")
    print("|---" * (len(EVAL_CATEGORIES) + 4) + "|")
    for size in (32, 16):
        renders = [render(Scene.from_dict(p["scene"]), size) for p in prompts]
        for blur, noise in DAMAGE:
            rng = np.random.default_rng(0)
            images = [damaged(image, blur, noise, rng) for image in renders]
            scores = score_by_category(images, prompts)
            cells = [f"{scores[f'{c}_accuracy']:.2f}" for c in (*EVAL_CATEGORIES, "overall")]
            print(f"| {size} | {blur} | {noise} | " + " | ".join(cells) + " |")
        start = time.perf_counter()
        for image in renders:
            read_scene(image)
        print(f"reader at {size} px: {len(renders) / (time.perf_counter() - start):.0f} images/s")


if __name__ == "__main__":
    main()
