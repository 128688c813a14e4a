"""The ShapeWorld prompt-following scores, all read by one instrument, `ml.eval.scene_reader`.

GenEval-style, by category (`follows`, `score_by_category`): an image follows a prompt when the
reader finds in it everything the prompt asks for, with Wilson intervals. Single-object colour
and position (`score_prompt_following`), what the text-to-image checks gate on: an image has
the asked colour when the reader finds an object of that colour, the asked position when it
finds an object in that cell, and both when one object has both; the shape is left to the
categories. The reader is measured on perturbed renders, blank and noise images and permuted
prompts by `bench/bench_oracle.py`.
"""

import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ml.data.shapeworld import (
    COLORS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    Scene,
    descriptive_caption,
    eval_prompts,
    parse_parts,
)
from ml.eval.scene_reader import Reading, read_scene


@dataclass
class PromptFollowingConfig:
    """How a text-to-image model is scored: which prompts, and how it samples them."""

    prompts: int = 72  # single-object prompts; positions cycle through the 9 cells
    seed: int = 1  # picks the prompts and the sampling noise
    guidance_scale: float = 3.0
    sampling_steps: int = 25  # the distilled model's section sets 2


def single_object_verdicts(reading: Reading, scene: Scene) -> tuple[bool, bool, bool]:
    """Whether the reading has an object of the scene's object's colour, one in its cell, and
    one with both."""
    want = scene.objects[0]
    colour = [o.color == want.color for o in reading.objects]
    position = [o.position == want.position for o in reading.objects]
    return any(colour), any(position), any(c and p for c, p in zip(colour, position, strict=True))


def score_prompt_following(
    images: Sequence[Image.Image], scenes: Sequence[Scene]
) -> dict[str, float]:
    """Colour, position and joint accuracy of single-object images against their target scenes,
    their 95% Wilson intervals (`_low`, `_high`), and the chance levels of a model that ignores
    the prompt (uniform over the palette and the grid)."""
    if len(images) != len(scenes) or not images:
        raise ValueError(f"need as many scenes as images (>0): {len(images)} vs {len(scenes)}")
    if any(len(scene.objects) != 1 for scene in scenes):
        raise ValueError("the oracle scores single-object scenes only")
    verdicts = np.array([
        single_object_verdicts(read_scene(image), scene)
        for image, scene in zip(images, scenes, strict=True)
    ]).reshape(-1, 3)  # fmt: skip
    scores = {"n": float(len(images))}
    for name, hits in zip(("color", "position", "both"), verdicts.T, strict=True):
        low, high = wilson(int(np.sum(hits)), len(images))
        scores |= {f"{name}_accuracy": float(np.mean(hits)), f"{name}_low": low}
        scores[f"{name}_high"] = high
    return scores | {
        "color_chance": 1 / len(COLORS),
        "position_chance": 1 / len(POSITIONS),
        "both_chance": 1 / (len(COLORS) * len(POSITIONS)),
    }


def single_object_prompts(seed: int, n: int) -> list[dict[str, Any]]:
    """n held-out prompts with their target scenes: the "position" category of `eval_prompts`,
    which cycles through the 9 cells.

    Each comes in two styles: "prompt", short as a user writes it ("a red circle in the top
    left"), and "descriptive", the target scene as a descriptive caption ("A plain white
    background with a large red circle in the top left."). A model trained on descriptive
    captions is asked in their style, as DALL·E 3 upsamples its users' prompts; the ground
    truth is the upsampler here, so the score measures the image model alone.
    """
    prompts = [p for p in eval_prompts(seed, per_category=n) if p["category"] == "position"]
    return [
        p | {"scene": Scene.from_dict(p["scene"]), "descriptive": descriptive_prompt(p, seed)}
        for p in prompts
    ]


def descriptive_prompt(prompt: dict[str, Any], seed: int) -> str:
    """A held-out prompt upsampled by the ground truth: its target scene's descriptive
    caption, seeded by the prompt."""
    scene = Scene.from_dict(prompt["scene"])
    return descriptive_caption(scene, random.Random(f"{seed}/{prompt['prompt']}"))


def evaluate_prompt_following(
    generate: Callable[[list[str]], list[Image.Image]],
    prompts: Sequence[dict[str, Any]],
    batch_size: int = 32,
    style: str = "descriptive",
) -> tuple[dict[str, float], list[Image.Image]]:
    """Scores of `generate` (prompts -> images, e.g. a seeded pipeline call) on
    `single_object_prompts` in one `style` ("descriptive" or "prompt"), and the images."""
    images = in_batches(generate, [p[style] for p in prompts], batch_size)
    return score_prompt_following(images, [p["scene"] for p in prompts]), images


def in_batches(
    generate: Callable[[list[str]], list[Image.Image]], texts: list[str], batch_size: int = 32
) -> list[Image.Image]:
    """`generate` over `texts`, `batch_size` prompts a call."""
    return [
        im for i in range(0, len(texts), batch_size) for im in generate(texts[i : i + batch_size])
    ]


def score_text_to_image(
    pipe: Any, cfg: PromptFollowingConfig
) -> tuple[dict[str, float], Image.Image]:
    """Prompt-following scores of a text-to-image pipeline, and the grid of its images under
    their prompts.

    Asked in the descriptive style of its training captions (the paper's upsampled prompts):
    single-object colour and position, and two-object prompts with both objects drawn
    (`two_object_*`, GenEval's verdict, `cfg.prompts` of them). The single-object prompts
    written short are scored too, as `short_*`, to show what upsampling buys.
    """
    from ml.viz import image_grid

    pipe.set_progress_bar_config(disable=True)
    prompts = single_object_prompts(cfg.seed, cfg.prompts)

    def generate(texts: list[str]) -> list[Image.Image]:
        return pipe(texts, cfg.sampling_steps, cfg.guidance_scale, seed=cfg.seed)

    scores, images = evaluate_prompt_following(generate, prompts, style="descriptive")
    short, _ = evaluate_prompt_following(generate, prompts, style="prompt")
    for name in ("color_accuracy", "position_accuracy", "both_accuracy"):
        scores[f"short_{name}"] = short[name]
    pairs = [p for p in eval_prompts(cfg.seed, cfg.prompts) if p["category"] == "two_object"]
    texts = [descriptive_prompt(p, cfg.seed) for p in pairs]
    two = score_by_category(in_batches(generate, texts), pairs)
    scores |= {k: v for k, v in two.items() if k.startswith("two_object_")}
    captions = [p["descriptive"] for p in prompts]
    return scores, image_grid(images, cols=9, scale=4, captions=captions)


def follows(reading: Reading, asks: dict[str, Any]) -> bool:
    """Whether a reading shows all a prompt asks (`shapeworld.eval_prompts`' "asks"): each
    object, with its stated colour and position, exactly `count` times if given, else at least
    once; the background and word where stated."""
    if asks.get("background") not in (None, reading.background):
        return False
    if asks.get("word") not in (None, reading.word):
        return False
    for want in asks["objects"]:
        stated = {k: v for k, v in want.items() if k != "count"}
        n = sum(all(getattr(o, k) == v for k, v in stated.items()) for o in reading.objects)
        if n != want["count"] if "count" in want else n == 0:
            return False
    return True


_SHAPES = "|".join(SHAPES)
_PLURAL_RE = re.compile(rf"\b({_SHAPES})(?:es|s)\b", re.IGNORECASE)
_COUNTED_RE = re.compile(
    rf"\b({'|'.join(NUMBER_WORDS[2:])})\b[^.,;]*?\b({_SHAPES})(?:es|s)\b", re.IGNORECASE
)


def prompt_asks(prompt: str) -> dict[str, Any] | None:
    """What a prompt asks of an image, as `follows` takes it ("asks" of `eval_prompts`): each
    named shape with the colour, size and position stated for it and a count where a number
    precedes it ("three red circles"), the background and word where stated; None when the
    prompt names no shape the world draws, so the instrument cannot judge it."""
    counts = {m.group(2).lower(): NUMBER_WORDS.index(m.group(1).lower())
              for m in _COUNTED_RE.finditer(prompt)}  # fmt: skip
    objects, facts = parse_parts(_PLURAL_RE.sub(r"\1", prompt))
    if not objects:
        return None
    asks: dict[str, Any] = {"objects": [
        {k: v for k, v in o.items() if v is not None}
        | ({"count": counts[o["shape"]]} if o["shape"] in counts else {})
        for o in objects
    ]}  # fmt: skip
    return asks | {kind: value for kind, value in facts if kind in ("background", "word")}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% at z = 1.96)."""
    if n == 0:
        raise ValueError("no trials")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score_by_category(
    images: Sequence[Image.Image], prompts: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """Per category: the share of images that follow their prompt, its 95% Wilson interval
    and the image count, as `<category>_accuracy`, `_low`, `_high`, `_n`; and GenEval's overall
    score, the mean of the categories' accuracies. The interval is over images; GenEval's 4
    images per prompt are not independent, so it is, if anything, too narrow."""
    return category_scores(verdicts_by_category(images, prompts))


def verdicts_by_category(
    images: Sequence[Image.Image], prompts: Sequence[dict[str, Any]]
) -> dict[str, list[bool]]:
    """Whether each image follows its prompt, by the prompts' category."""
    if len(images) != len(prompts) or not images:
        raise ValueError(f"need one prompt per image (>0): {len(images)} vs {len(prompts)}")
    hits: dict[str, list[bool]] = defaultdict(list)
    for image, prompt in zip(images, prompts, strict=True):
        hits[prompt["category"]].append(follows(read_scene(image), prompt["asks"]))
    return dict(hits)


def category_scores(verdicts: Mapping[str, Sequence[bool]]) -> dict[str, float]:
    """Per category of verdicts: their share, its 95% Wilson interval and their count
    (`<category>_accuracy`, `_low`, `_high`, `_n`); and the mean of the categories' shares
    (`overall_accuracy`, GenEval's overall score)."""
    scores: dict[str, float] = {}
    for category, hits in verdicts.items():
        low, high = wilson(sum(hits), len(hits))
        scores |= {
            f"{category}_accuracy": sum(hits) / len(hits),
            f"{category}_low": low,
            f"{category}_high": high,
            f"{category}_n": float(len(hits)),
        }
    scores["overall_accuracy"] = sum(sum(v) / len(v) for v in verdicts.values()) / len(verdicts)
    return scores
