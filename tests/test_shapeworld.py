"""ShapeWorld must be reproducible and its captions must agree with the scenes they describe."""

import json
import math
import random
from collections import Counter
from dataclasses import replace

import pytest

from ml.data.shapeworld import (
    BACKGROUNDS,
    COLORS,
    EVAL_CATEGORIES,
    POSITIONS,
    AltTextNoise,
    Scene,
    SceneObject,
    ShapeWorldConfig,
    alt_text,
    caption_facts,
    descriptive_caption,
    eval_prompts,
    generate,
    parse_caption,
    render,
    sample_scene,
    score_caption,
    short_caption,
    visible_colors,
)

CFG = ShapeWorldConfig()


def scenes(n: int, seed: int = 0) -> list[tuple[Scene, random.Random]]:
    rngs = [random.Random(f"test/{seed}/{i}") for i in range(n)]
    return [(sample_scene(rng, CFG), rng) for rng in rngs]


def as_tuple(sample) -> tuple:
    return sample.key, sample.image.tobytes(), sample.text, json.dumps(sample.meta)


def test_same_seed_gives_identical_samples_and_different_seeds_differ():
    first = [as_tuple(s) for s in generate(20, seed=1, cfg=CFG, split="train")]
    again = [as_tuple(s) for s in generate(20, seed=1, cfg=CFG, split="train")]
    other = [as_tuple(s) for s in generate(20, seed=2, cfg=CFG, split="train")]
    assert first == again
    assert sum(a[1:] != b[1:] for a, b in zip(first, other, strict=True)) >= 18


def test_a_slice_equals_the_tail_of_a_full_run():
    full = [as_tuple(s) for s in generate(30, seed=3, cfg=CFG, split="val")]
    tail = [as_tuple(s) for s in generate(10, seed=3, cfg=CFG, split="val", start=20)]
    assert tail == full[20:]


def test_sample_keys_and_meta():
    sample = next(generate(1, seed=0, cfg=CFG, split="train", start=7))
    assert sample.key == "train00000007"
    assert sample.meta["split"] == "train" and sample.meta["index"] == 7
    assert set(sample.meta) == {
        "split",
        "index",
        "scene",
        "alt_text_kind",
        "short_caption",
        "descriptive_caption",
    }
    assert sample.image.size == (32, 32) and sample.image.mode == "RGB"
    with pytest.raises(ValueError, match="split"):
        next(generate(1, seed=0, cfg=CFG, split="a.b"))


def test_scenes_are_well_formed_and_round_trip():
    for scene, _ in scenes(500):
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
        assert CFG.min_objects <= len(scene.objects) <= CFG.max_objects
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        main, *others = scene.objects  # the main subject is visible: largest, then reading order
        for other in others:
            assert main.size == "large" or other.size == "small"
            if other.size == main.size:
                assert POSITIONS.index(main.position) < POSITIONS.index(other.position)
        assert all(o.color in visible_colors(scene.background) for o in scene.objects)


def test_descriptive_caption_mentions_every_fact():
    for scene, rng in scenes(200):
        text = descriptive_caption(scene, rng)
        for o in scene.objects:
            assert f"{o.size} {o.color} {o.shape}" in text
            position = "middle" if o.position == "center" and "middle" in text else o.position
            assert position in text
        assert f"{scene.background} background" in text
        if scene.word:
            assert f'"{scene.word}"' in text


def test_parse_recovers_every_fact_of_a_descriptive_caption():
    for scene, rng in scenes(500, seed=1):
        text = descriptive_caption(scene, rng)
        assert parse_caption(text) == caption_facts(scene), text


def test_short_caption_names_the_main_object():
    for scene, rng in scenes(200):
        text = short_caption(scene, rng).lower()
        main = scene.objects[0]
        assert f"{main.color} {main.shape}" in text
        others = {f"{o.color} {o.shape}" for o in scene.objects[1:]} - {
            f"{main.color} {main.shape}"
        }
        assert not any(other in text for other in others)


def test_alt_text_kinds_follow_the_noise_rates():
    noise = CFG.noise
    kinds = Counter(alt_text(scene, rng, noise)[1] for scene, rng in scenes(2000, seed=2))
    expected = {
        "terse": noise.terse,
        "wrong": noise.wrong,
        "irrelevant": noise.irrelevant,
        "empty": noise.empty,
        "partial": 1 - noise.terse - noise.wrong - noise.irrelevant - noise.empty,
    }
    for kind, rate in expected.items():
        assert abs(kinds[kind] / 2000 - rate) < 0.03, (kind, kinds)


def test_true_alt_text_kinds_state_only_true_facts():
    for scene, rng in scenes(500, seed=3):
        text, kind = alt_text(scene, rng, CFG.noise)
        score = score_caption(text, scene)
        if kind in ("terse", "partial"):
            assert score["precision"] == 1.0, text
        elif kind == "wrong":
            assert score["precision"] < 1.0, text
        elif kind == "empty":
            assert text == "" and score["stated"] == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"wrong": 1.5}, "wrong"), ({"empty": -0.1}, "empty"), ({"terse": 0.9}, "sum")],
)
def test_noise_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AltTextNoise(**kwargs)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_render_draws_the_object_colour_in_its_cell(size):
    for i, position in enumerate(POSITIONS):
        background = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        color = visible_colors(background)[i % len(visible_colors(background))]
        obj = SceneObject(("circle", "square", "diamond")[i % 3], color, "large", position)
        image = render(Scene(background, "plain", (obj,)), size)
        assert image.size == (size, size) and image.mode == "RGB"
        row, col = divmod(i, 3)
        pixel = image.getpixel((int((col + 0.5) * size / 3), int((row + 0.5) * size / 3)))
        assert math.dist(pixel, COLORS[color]) < 10, (size, position, pixel, color)


def test_render_handles_words_textures_and_large_sizes():
    scene = Scene(
        "navy",
        "stripes",
        tuple(
            SceneObject(s, "yellow", "small", p)
            for s, p in zip(("star", "cross", "triangle", "circle"), POSITIONS[3:7], strict=True)
        ),
        "STOP",
    )
    for size in (16, 256):
        assert render(scene, size).size == (size, size)
    plain = render(replace(scene, texture="plain", word=None), 64)
    assert render(scene, 64).tobytes() != plain.tobytes()


def test_score_caption_penalises_a_wrong_colour():
    scene = Scene(
        "gray",
        "dots",
        (
            SceneObject("circle", "red", "large", "top left"),
            SceneObject("square", "blue", "small", "center"),
        ),
        "SUN",
    )
    rng = random.Random(0)
    perfect = score_caption(descriptive_caption(scene, rng), scene)
    assert perfect["recall"] == perfect["precision"] == 1.0
    wrong = replace(scene, objects=(replace(scene.objects[0], color="green"), scene.objects[1]))
    score = score_caption(descriptive_caption(wrong, rng), scene)
    assert score["recall"] < 1.0 and score["precision"] < 1.0
    assert score["correct"] == score["total"] - 1
    assert score_caption("", scene)["recall"] == 0.0


def test_eval_prompts_cover_every_category():
    prompts = eval_prompts(seed=0, per_category=8)
    assert prompts == eval_prompts(seed=0, per_category=8)
    counts = Counter(p["category"] for p in prompts)
    assert counts == {category: 8 for category in EVAL_CATEGORIES}
    for p in prompts:
        scene = Scene.from_dict(p["scene"])
        stated = [f for f in parse_caption(p["prompt"]) if f[0] == "object"]
        for _, color, shape, _, position in stated:
            assert any(
                shape == o.shape and color in (None, o.color) and position in (None, o.position)
                for o in scene.objects
            ), p
        if p["category"] == "text":
            assert scene.word and f'"{scene.word}"' in p["prompt"]
