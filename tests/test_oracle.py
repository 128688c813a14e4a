"""The analytic prompt-following oracle: exact on ground-truth ShapeWorld renders, at chance
when the targets are shuffled."""

import itertools
import random

import pytest

from ml.data.shapeworld import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Scene,
    SceneObject,
    caption_facts,
    parse_caption,
    render,
    visible_colors,
)
from ml.eval.oracle import (
    evaluate_prompt_following,
    find_object,
    score_prompt_following,
    single_object_prompts,
)


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


def test_find_object_on_a_textured_background() -> None:
    scene = Scene("navy", "stripes", (SceneObject("star", "yellow", "small", "bottom left"),))
    assert find_object(render(scene, 32)) == ("yellow", "bottom left")


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
