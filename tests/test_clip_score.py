"""CLIP-S (`ml.eval.clip_score`): both variants, RefCLIP-S, long captions, `dalle3 clip-score`."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dalle3_dag.cli import main
from ml.clip import build_toy_clip, save_clip, toy_transforms
from ml.clip_config import ClipConfig
from ml.eval.clip_score import HESSEL_PREFIX, clip_score


class FixedClip(torch.nn.Module):
    """A stand-in CLIP with fixed embeddings: image i (a 1-pixel image of value i) and text t
    embed as the given vectors, so every score can be worked out by hand."""

    text_pool_type = "fixed"  # no end-of-text token to cut at: `encode_text` is called

    def __init__(self, images: list[list[float]], texts: dict[str, list[float]]) -> None:
        super().__init__()
        self.image_table = torch.tensor(images)
        self.text_names = list(texts)
        self.text_table = torch.tensor(list(texts.values()))

    def encode_image(self, ids: torch.Tensor, normalize: bool) -> torch.Tensor:
        return torch.nn.functional.normalize(self.image_table[ids.long()], dim=-1)

    def encode_text(self, ids: torch.Tensor, normalize: bool) -> torch.Tensor:
        return torch.nn.functional.normalize(self.text_table[ids], dim=-1)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.tensor(image.getpixel((0, 0)))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.text_names.index(t) for t in texts])


def fixed_scores(variant: str, references: list[list[str]] | None = None):
    prefix = HESSEL_PREFIX if variant == "hessel" else ""
    texts = {"a": [1.0, 0.0], "b": [0.6, 0.8], "c": [-1.0, 0.0], "r1": [0.0, 1.0], "r2": [1.0, 1.0]}
    model = FixedClip([[1.0, 0.0]] * 3, {prefix + k: v for k, v in texts.items()})
    images = [Image.new("L", (1, 1), i) for i in range(3)]
    return clip_score(
        model, model.preprocess, model.tokenize, images, ["a", "b", "c"], variant, references
    )


def test_paper_variant_is_the_mean_cosine_times_100():
    score = fixed_scores("paper")
    # cosines with image (1, 0): a 1, b 0.6, c -1; the paper's variant keeps the negative one
    assert score.per_pair == pytest.approx([100.0, 60.0, -100.0])
    assert score.score == pytest.approx(20.0)


def test_hessel_variant_clips_at_zero_weights_by_2_5_and_prefixes():
    score = fixed_scores("hessel")  # the texts exist under the prefix only: a lookup proves it
    assert score.per_pair == pytest.approx([2.5, 1.5, 0.0])
    assert score.score == pytest.approx(4.0 / 3)


def test_ref_clip_s_is_the_harmonic_mean_with_the_best_reference():
    score = fixed_scores("hessel", references=[["r1", "r2"], ["r1"], ["r1"]])
    best = [1 / math.sqrt(2), 0.8, 0.0]  # a~r2, b~r1; c~r1 is 0
    expected = [2 * 2.5 * best[0] / (2.5 + best[0]), 2 * 1.5 * 0.8 / 2.3, 0.0]
    assert score.ref_per_pair == pytest.approx(expected)
    assert score.ref_score == pytest.approx(sum(expected) / 3)


def test_bad_variant_and_references_on_the_paper_variant_fail():
    with pytest.raises(ValueError, match="variant must be one of"):
        fixed_scores("clipscore")
    with pytest.raises(ValueError, match="'hessel' variant only"):
        fixed_scores("paper", references=[["r1"]] * 3)


def tiny_clip() -> tuple[torch.nn.Module, ClipConfig]:
    cfg = ClipConfig(context_length=16, text_layers=1, vision_layers=2, patch_size=8)
    torch.manual_seed(0)
    return build_toy_clip(cfg).eval(), cfg


def test_a_caption_longer_than_the_context_keeps_its_end_of_text_token():
    model, cfg = tiny_clip()
    preprocess, tokenizer = toy_transforms(cfg)
    long = " ".join(["red circle"] * 40)
    tokens = tokenizer([long])
    assert tokens.shape == (1, 16) and tokens[0, -1] == tokenizer.eot_token_id
    # the same as encoding the truncation by hand: start, the first 14 tokens, end-of-text
    cut = [tokenizer.sot_token_id, *tokenizer.encode(long)[:14], tokenizer.eot_token_id]
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    by_hand = clip_score(
        model, preprocess, lambda texts: torch.tensor([cut] * len(texts)), [image], [long]
    )
    assert clip_score(model, preprocess, tokenizer, [image], [long]).score == pytest.approx(
        by_hand.score, abs=1e-6
    )


@pytest.fixture
def scored_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    model, cfg = tiny_clip()
    save_clip(model, cfg, tmp_path / "clip")
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a plain image number {i}"})
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "clip", images, captions


def test_cli_prints_the_score_last_and_writes_per_pair_scores(scored_folder, capsys):
    clip, images, captions = scored_folder
    args = ["clip-score", "--images", str(images), "--captions", str(captions)]
    assert main([*args, "--model", f"local-dir:{clip}", "--variant", "hessel"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rows = [json.loads(line) for line in captions.with_name("captions.clip_s_hessel.jsonl")
            .read_text().splitlines()]
    assert [r["image"] for r in rows] == ["0.png", "1.png", "2.png"]
    mean = sum(r["hessel"] for r in rows) / 3
    assert last == f"CLIP-S (hessel): {mean:.4f}"
    out = captions.with_name("scores.csv")
    assert main([*args, "--model", str(clip), "--out", str(out)]) == 0
    header, *lines = out.read_text().splitlines()
    assert header == "image,caption,cosine,paper" and len(lines) == 3


def test_cli_names_a_missing_image_and_a_malformed_line(scored_folder):
    clip, images, captions = scored_folder
    args = ["clip-score", "--images", str(images), "--model", str(clip), "--captions"]
    (images / "1.png").unlink()
    with pytest.raises(SystemExit, match=r"captions.jsonl:2: image not found: .*1.png"):
        main([*args, str(captions)])
    bad = captions.with_name("bad.jsonl")
    bad.write_text('{"image": "0.png", "caption": "fine"}\n{"image": "0.png", "caption": \n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not a JSON object"):
        main([*args, str(bad)])
    (images / "0.png").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"captions.jsonl:1: cannot read image .*0.png"):
        main([*args, str(captions)])
