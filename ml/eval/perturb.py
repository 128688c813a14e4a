"""What the prompt-following instrument is measured on before it is trusted
(`bench/bench_oracle.py`, tests/test_oracle.py): renders drawn as a careful person would still
read them right, and prompts an image should not follow.

A generated image is never the template: objects sit a few pixels off their cell's centre, a
little larger or smaller, blurred, in a nearby shade, over a grainy background.
"""

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from ml.data.shapeworld import BACKGROUNDS, COLORS, RGB, Placement, Scene, render
from ml.eval.oracle import follows
from ml.eval.scene_reader import Reading


@dataclass(frozen=True)
class Perturbation:
    """The largest departure drawn, each uniformly up to its bound (sizes at 32 px)."""

    shift: float = 3.0  # pixels, each object on each axis
    scale: float = 0.15  # relative size change of each object
    blur: float = 1.0  # Gaussian blur radius in pixels
    colour: int = 15  # per channel, each object and the background
    noise: float = 4.0  # standard deviation of per-pixel Gaussian noise


def _jitter(rgb: RGB, amount: int, rng: random.Random) -> RGB:
    r, g, b = (min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)
    return r, g, b


def perturbed_render(
    scene: Scene, size: int, rng: random.Random, p: Perturbation = Perturbation()
) -> Image.Image:
    """`scene` drawn with every object moved, scaled and reshaded, then blurred and noised,
    each by a random amount within `p` (distances scale with `size` / 32)."""
    k = size / 32
    placements = tuple(
        Placement(
            dx=rng.uniform(-p.shift, p.shift) * k,
            dy=rng.uniform(-p.shift, p.shift) * k,
            scale=1 + rng.uniform(-p.scale, p.scale),
            rgb=_jitter(COLORS[obj.color], p.colour, rng),
        )
        for obj in scene.objects
    )
    background = _jitter(BACKGROUNDS[scene.background], p.colour, rng)
    image = render(scene, size, placements, background)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, p.blur) * k))
    pixels = np.asarray(image, dtype=np.float64)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, p.noise, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8))


def mismatched(prompts: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """For each prompt's target scene, another prompt of its category that the scene does not
    follow (by its ground truth, not by a reading), drawn in a seeded order: an image that
    follows it is a false positive of the instrument, or a model drawing what was not asked."""
    rng, out = random.Random(seed), []
    for prompt in prompts:
        scene = Scene.from_dict(prompt["scene"])
        truth = Reading(scene.background, scene.objects, scene.word, ())
        others = [p for p in prompts if p["category"] == prompt["category"]]
        out.append(next(p for p in rng.sample(others, len(others))
                        if not follows(truth, p["asks"])))  # fmt: skip
    return out
