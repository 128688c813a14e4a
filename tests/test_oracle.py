"""The prompt-following instrument, the scene reader behind every score: exact on ground-truth
ShapeWorld renders, right on renders drawn as a person would still read them, at chance when
the targets are shuffled, and fooled by neither blank nor noise images."""

import itertools
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ml.data.shapeworld import (
    BACKGROUNDS,
    COLORS,
    EVAL_CATEGORIES,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Placement,
    Scene,
    SceneObject,
    ShapeWorldConfig,
    caption_facts,
    eval_prompts,
    generate,
    parse_caption,
    render,
    visible_colors,
)
from ml.eval.oracle import (
    evaluate_prompt_following,
    follows,
    prompt_asks,
    score_by_category,
    score_prompt_following,
    single_object_prompts,
    single_object_verdicts,
    wilson,
)
from ml.eval.perturb import mismatched, perturbed_render
from ml.eval.scene_reader import Reading, read_scene


@pytest.fixture(scope="module")
def renders() -> tuple[list[Scene], list]:
    """2000 single-object scenes drawn from every combination of attributes, rendered at 32."""
    every = [
        Scene(background, texture, (SceneObject(shape, color, size, position),))
        for color, position, shape, size, texture, background in itertools.product(
            COLORS, POSITIONS, SHAPES, SIZES, TEXTURES, BACKGROUNDS
        )
        if color in visible_colors(background)
    ]
    scenes = random.Random(0).sample(every, 2000)
    return scenes, [render(scene, 32) for scene in scenes]


def test_exact_on_ground_truth_renders(renders: tuple[list[Scene], list]) -> None:
    scenes, images = renders
    scores = score_prompt_following(images, scenes)
    assert scores["color_accuracy"] == scores["position_accuracy"] == 1.0
    assert scores["both_accuracy"] == 1.0 and scores["n"] == 2000


def test_at_chance_on_shuffled_targets(renders: tuple[list[Scene], list]) -> None:
    scenes, images = renders
    shuffled = random.Random(1).sample(scenes, len(scenes))
    scores = score_prompt_following(images, shuffled)
    assert scores["color_chance"] == 1 / len(COLORS)
    assert scores["position_chance"] == 1 / len(POSITIONS)
    assert abs(scores["color_accuracy"] - scores["color_chance"]) < 0.04
    assert abs(scores["position_accuracy"] - scores["position_chance"]) < 0.04


def test_single_object_verdicts_on_a_textured_background() -> None:
    scene = Scene("navy", "stripes", (SceneObject("star", "yellow", "small", "bottom left"),))
    reading = read_scene(render(scene, 32))
    assert single_object_verdicts(reading, scene) == (True, True, True)
    elsewhere = replace(scene.objects[0], color="red", position="top")
    assert single_object_verdicts(reading, replace(scene, objects=(elsewhere,))) == (
        False, False, False
    )  # fmt: skip


def test_rejects_multi_object_scenes_and_length_mismatch() -> None:
    one = Scene("gray", "plain", (SceneObject("circle", "red", "large", "top"),))
    two = Scene("gray", "plain", one.objects * 2)
    with pytest.raises(ValueError, match="single-object"):
        score_prompt_following([render(two, 32)], [two])
    with pytest.raises(ValueError, match="as many"):
        score_prompt_following([render(one, 32)], [one, one])


def test_single_object_prompts_cover_the_grid_and_score_perfectly_when_rendered() -> None:
    prompts = single_object_prompts(seed=0, n=18)
    assert len(prompts) == 18
    assert {p["scene"].objects[0].position for p in prompts} == set(POSITIONS)
    for style in ("prompt", "descriptive"):
        by_text = {p[style]: p["scene"] for p in prompts}

        def draw(texts: list[str], by_text=by_text) -> list:
            return [render(by_text[t], 32) for t in texts]

        scores, images = evaluate_prompt_following(draw, prompts, batch_size=5, style=style)
        assert len(images) == 18 and scores["both_accuracy"] == 1.0
    # the descriptive style states the target scene in full, as the training captions do
    first = prompts[0]
    facts = parse_caption(first["descriptive"])
    assert facts == caption_facts(first["scene"]) and first["prompt"] != first["descriptive"]


# --- the scene reader and GenEval-style categories ------------------------------------------


@pytest.mark.parametrize("size", [16, 32])
def test_every_category_is_read_exactly_from_ground_truth_renders(size: int) -> None:
    """The instrument's own accuracy, per category, on renders of the held-out prompts'
    target scenes (>= 0.98 required; it is exact)."""
    prompts = eval_prompts(seed=1, per_category=32)
    images = [render(Scene.from_dict(p["scene"]), size) for p in prompts]
    scores = score_by_category(images, prompts)
    for category in EVAL_CATEGORIES:
        assert scores[f"{category}_accuracy"] == 1.0, category
        assert scores[f"{category}_n"] == 32
    assert scores["overall_accuracy"] == 1.0
    for image, prompt in zip(images[:40], prompts, strict=False):
        reading = read_scene(image)
        scene = Scene.from_dict(prompt["scene"])
        assert (reading.background, set(reading.objects), reading.word) == (
            scene.background, set(scene.objects), scene.word
        )


def test_another_prompts_scene_fails_its_prompt() -> None:
    """Each prompt scored on the render of the next prompt of its category: almost nothing
    follows (two_object can, when both scenes hold the same two shapes)."""
    prompts = eval_prompts(seed=1, per_category=16)
    by_category = itertools.groupby(prompts, key=lambda p: p["category"])
    images, targets = [], []
    for _, group in by_category:
        group = list(group)
        for i, prompt in enumerate(group):
            images.append(render(Scene.from_dict(group[(i + 1) % len(group)]["scene"]), 32))
            targets.append(prompt)
    scores = score_by_category(images, targets)
    assert scores["overall_accuracy"] < 0.05


def test_textured_training_scenes_are_read_too() -> None:
    samples = list(generate(100, 0, ShapeWorldConfig(image_size=32), "train"))
    right = sum(
        set(read_scene(s.image).objects) == set(Scene.from_dict(s.meta["scene"]).objects)
        and read_scene(s.image).word == s.meta["scene"]["word"]
        for s in samples
    )
    assert right == 100


def test_follows_holds_an_image_to_what_the_prompt_asks() -> None:
    red_circle = SceneObject("circle", "red", "small", "top left")
    reading = Reading("gray", (red_circle, replace(red_circle, position="top")), "CAT", (1, 1))
    assert follows(reading, {"objects": [{"shape": "circle", "color": "red", "count": 2}]})
    assert not follows(reading, {"objects": [{"shape": "circle", "color": "red", "count": 3}]})
    assert not follows(reading, {"objects": [{"shape": "circle", "color": "blue"}]})
    assert follows(reading, {"objects": [{"shape": "circle", "position": "top"}], "word": "CAT"})
    assert not follows(reading, {"objects": [{"shape": "circle"}], "word": "DOG"})
    assert not follows(reading, {"objects": [{"shape": "circle"}], "background": "navy"})
    assert not follows(reading, {"objects": [{"shape": "circle"}, {"shape": "square"}]})


def test_wilson_interval_matches_the_formula() -> None:
    low, high = wilson(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 32)[0] == 0.0 and wilson(32, 32)[1] == 1.0
    with pytest.raises(ValueError):
        wilson(0, 0)


# --- the instrument on drawings that are not the template -------------------------------------

TARGETED = ("single_object", "two_object", "colors", "position", "color_attr")


def test_an_object_drawn_off_its_template_is_read_in_its_cell_alone() -> None:
    """Moved 3 px towards a corner, 15% larger and blurred, a large circle still reads as one
    large circle in its own cell, though it reaches into three neighbours."""
    scene = Scene("white", "plain", (SceneObject("circle", "blue", "large", "left"),))
    for dx, dy in itertools.product((-3, 3), (-3, 3)):
        image = render(scene, 32, (Placement(dx, dy, 1.15),)).filter(ImageFilter.GaussianBlur(1))
        assert read_scene(image).objects == scene.objects, (dx, dy)


def test_perturbed_renders_are_read_right_in_every_targeted_category() -> None:
    """The issue's bar (>= 0.95) on 48 prompts a category, moved, scaled, blurred, reshaded and
    noised at once; counting and text (small objects, words) are measured, not held to it."""
    prompts = [p for p in eval_prompts(seed=3, per_category=48) if p["category"] in TARGETED]
    rng = random.Random(0)
    images = [perturbed_render(Scene.from_dict(p["scene"]), 32, rng) for p in prompts]
    scores = score_by_category(images, prompts)
    for category in TARGETED:
        assert scores[f"{category}_accuracy"] >= 0.95, category


def test_nothing_drawn_follows_no_prompt() -> None:
    """Blank backgrounds of every colour and texture, and noise, read as no object at all."""
    rng = np.random.default_rng(0)
    blank = [render(Scene(bg, texture, ()), 32) for bg in BACKGROUNDS for texture in TEXTURES]
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    noise += [
        Image.fromarray(np.clip(rng.normal(BACKGROUNDS[bg], 30, (32, 32, 3)), 0, 255).astype(
            np.uint8)) for bg in BACKGROUNDS
    ]  # fmt: skip
    for image in blank + noise:
        assert read_scene(image).objects == ()


def test_perturbed_renders_of_other_prompts_rarely_follow() -> None:
    """The false-positive rate stays under 0.05 in every category when the images are not
    templates: each perturbed render scored against a prompt its scene does not follow."""
    prompts = eval_prompts(seed=1, per_category=24)
    rng = random.Random(0)
    images = [perturbed_render(Scene.from_dict(p["scene"]), 32, rng) for p in prompts]
    asked = mismatched(prompts)
    pairs = zip(asked, prompts, strict=True)
    assert all(a["category"] == p["category"] and a != p for a, p in pairs)
    scores = score_by_category(images, asked)
    for category in EVAL_CATEGORIES:
        assert scores[f"{category}_accuracy"] < 0.05, category


def test_a_prompt_is_parsed_into_what_it_asks() -> None:
    """Every held-out prompt parses back to the "asks" it was made with, so `dalle3 generate`
    judges a user's prompt as the benchmarks judge theirs."""
    for prompt in eval_prompts(seed=1, per_category=64):
        assert prompt_asks(prompt["prompt"]) == prompt["asks"], prompt["prompt"]
    assert prompt_asks("Two large blue stars in the top left") == {
        "objects": [{"color": "blue", "shape": "star", "size": "large", "position": "top left",
                     "count": 2}]
    }  # fmt: skip
    assert prompt_asks("a photo of a dog") is None
