"""The prompt upsampler's parts: its training pairs, how its rewrites are scored, and the local
T5 backend (save/load round trip, seeded decoding)."""

import random

import pytest
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration

from ml.config import TrainConfig
from ml.data.sample import Sample
from ml.data.shapeworld import Scene, SceneObject, ShapeWorldConfig, generate, user_prompt
from ml.upsampler import load_upsampler
from ml.upsampler.config import T5Shape, UpsamplerConfig
from ml.upsampler.evaluate import added_details, keeps, score_upsampling
from ml.upsampler.model import LocalUpsampler, build_model, train_upsampler
from ml.upsampler.pairs import described, overlap, written

RED_CIRCLE = SceneObject("circle", "red", "large", "top left")
BLUE_SQUARE = SceneObject("square", "blue", "small", "bottom")
SCENE = Scene("white", "plain", (RED_CIRCLE, BLUE_SQUARE, RED_CIRCLE.__class__(
    "circle", "red", "small", "right")), word="HI")  # fmt: skip
TINY = UpsamplerConfig(
    vocab_size=300,
    model=T5Shape(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2),
    max_new_tokens=40,
    train=TrainConfig(steps=120, batch_size=8, lr=0.01, warmup_steps=5, log_every=40),
)
PAIRS = [
    ("a red circle", "A plain white background with a large red circle in the center."),
    ("a blue square", "A plain black background with a small blue square at the top."),
    ("a green star", "A plain gray background with a large green star on the left."),
    ("a white cross", "A plain navy background with a small white cross at the bottom."),
] * 4


def sample_of(scene: Scene, text: str = "") -> Sample:
    meta = {"scene": scene.to_dict(), "descriptive_caption": "the whole scene"}
    return Sample("labelled00000001", None, text, meta)


def test_overlap_is_the_share_of_the_source_words_the_target_uses() -> None:
    assert overlap("a red circle", "A large red circle at the top.") == 1.0
    assert overlap("a red star", "A large red circle at the top.") == 0.5
    assert overlap("IMG_0423.jpg", "A large red circle.") == 0.0
    assert overlap("", "anything") == 0.0


def test_a_target_describes_only_what_its_source_mentions() -> None:
    # one red circle asked: one described (the first in the scene), no square, no word
    text = described(sample_of(SCENE), "a red circle")
    assert keeps(text, {"objects": [{"shape": "circle", "color": "red", "count": 1}]})
    assert "square" not in text and "HI" not in text
    both = described(sample_of(SCENE), 'a blue square and a circle with the text "HI"')
    assert "square" in both and both.count("circle") == 1 and '"HI"' in both
    # nothing of the scene named (junk alt-text): the whole caption, which the overlap drops
    assert described(sample_of(SCENE), "free shipping") == "the whole scene"


def test_written_prompts_are_kept_by_their_own_targets() -> None:
    """Every user-style prompt of a labelled scene is true of the caption it is paired with,
    counts and positions included."""
    seen = set()
    for sample in generate(200, seed=0, cfg=ShapeWorldConfig(), split="labelled"):
        prompt, target = written(sample)
        scene = Scene.from_dict(sample.meta["scene"])
        _, part = user_prompt(scene, random.Random(f"upsampler/{sample.key}/prompt"))
        asks = {"objects": [{"shape": o.shape, "color": o.color} for o in part.objects]}
        assert keeps(target, asks), (prompt, target)
        seen.add(prompt.split()[0])
    assert "two" in seen  # counts and pairs occur


def test_keeps_holds_an_upsampled_text_to_what_the_prompt_asks() -> None:
    asks = {"objects": [{"shape": "circle", "color": "red", "position": "top left"}]}
    assert keeps("A plain white background with a large red circle in the top left.", asks)
    assert not keeps("A plain white background with a large blue circle in the top left.", asks)
    assert not keeps("A large red circle in the center on a plain white background.", asks)
    counted = {"objects": [{"shape": "star", "color": "green", "count": 2}]}
    two = "Two shapes on a plain gray background: a small green star at the top and a large green star on the left."  # noqa: E501
    assert keeps(two, counted) and not keeps("A small green star at the top.", counted)


def test_added_details_name_what_the_prompt_left_open() -> None:
    text = "A plain white background with a large red circle in the top left and a small blue square."  # noqa: E501
    assert added_details("a red circle", text) == [
        "background: white", "circle size: large", "circle position: top left",
        "object: small blue square",
    ]  # fmt: skip
    assert added_details("a red circle in the top left on a white background", text) == [
        "circle size: large", "object: small blue square"
    ]


def test_score_upsampling_per_category_and_overall() -> None:
    prompts = [
        {"category": "colors", "asks": {"objects": [{"shape": "circle", "color": "red"}]}},
        {"category": "colors", "asks": {"objects": [{"shape": "star", "color": "red"}]}},
        {"category": "text", "asks": {"objects": [{"shape": "star"}], "word": "HI"}},
    ]
    texts = ["A red circle.", "A blue star.", 'A large star. It reads "HI".']
    scores = score_upsampling(prompts, texts)
    assert scores["kept_colors_accuracy"] == 0.5 and scores["kept_text_accuracy"] == 1.0
    assert scores["kept_overall_accuracy"] == 0.75
    assert scores["kept_colors_low"] < 0.5 < scores["kept_colors_high"]
    assert scores["words_mean"] == (3 + 3 + 6) / 3
    with pytest.raises(ValueError, match="one upsampled text per prompt"):
        score_upsampling(prompts, texts[:2])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    model, tokenizer = build_model(TINY, [t for pair in PAIRS for t in pair])
    result = train_upsampler(model, tokenizer, PAIRS, TINY)
    folder = tmp_path_factory.mktemp("upsampler")
    LocalUpsampler(model, tokenizer).save_pretrained(folder, TINY.max_new_tokens)
    return folder, result


def test_the_local_upsampler_learns_and_round_trips(trained) -> None:
    folder, result = trained
    assert result.curve[-1]["loss"] < result.curve[0]["loss"] / 4
    upsample = load_upsampler(folder)
    prompts = [p for p, _ in PAIRS[:4]]
    texts = upsample(prompts)
    assert texts == [t for _, t in PAIRS[:4]]  # memorised: greedy decoding reads it back
    # the folder is plain transformers: the same weights and tokenizer load without our code
    model = T5ForConditionalGeneration.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.generation_config.max_new_tokens == TINY.max_new_tokens
    assert LocalUpsampler(model, tokenizer)(prompts) == texts


def test_sampled_decoding_is_a_function_of_the_seed(trained) -> None:
    folder, _ = trained
    upsample = LocalUpsampler.from_pretrained(folder, temperature=5.0)
    prompts = ["a red circle", "a purple star on the left"] * 3
    first = upsample(prompts, seed=3)
    assert upsample(prompts, seed=3) == first
    assert upsample(prompts, seed=4) != first


def test_a_missing_upsampler_folder_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_upsampler(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="backend"):
        load_upsampler(tmp_path, backend="gpt")
    with pytest.raises(ValueError, match="min_overlap"):
        UpsamplerConfig(min_overlap=2.0)
