"""The toy T5's pretraining (`ml.diffusion.text_pretraining`): span corruption hides what the
target restores, training lowers the loss, and the saved encoder loads frozen through the real
profile's code path (`text_encoder_path`) with the same states."""

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ml.config import TrainConfig
from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.diffusion.config import DiffusionConfig
from ml.diffusion.pipeline import build_text_encoder, encode_prompts
from ml.diffusion.text_pretraining import (
    TextPretrainConfig,
    corrupt_spans,
    pretrain_text_encoder,
    save_text_encoder,
    world_text,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SENTINELS = [1000 + i for i in range(8)]


def restore(source: list[int], target: list[int]) -> list[int]:
    """The original ids from a corrupted pair: each sentinel in `source` replaced by its span."""
    spans: dict[int, list[int]] = {}
    for token in target:
        if token in SENTINELS:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    return [t for token in source for t in (spans[token] if token in SENTINELS else [token])]


@pytest.mark.parametrize("n", [2, 5, 17, 40])
def test_span_corruption_hides_what_the_target_restores(n: int) -> None:
    ids = list(range(n))
    for seed in range(20):
        source, target = corrupt_spans(ids, SENTINELS, 0.15, 3.0, random.Random(seed))
        assert restore(source, target) == ids
        hidden = len(target) - sum(token in SENTINELS for token in target)
        assert hidden == max(1, round(n * 0.15))  # the density, at least one token
        used = [token for token in source if token in SENTINELS]
        assert used == SENTINELS[: len(used)]  # sentinels in order, each once


def test_pretraining_learns_and_the_encoder_loads_through_text_encoder_path(
    tmp_path: Path,
) -> None:
    texts = world_text(list(generate(64, 0, ShapeWorldConfig(image_size=16), "train")))
    assert len(texts) >= 64 * 2
    small = TrainConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=2, log_every=1)
    cfg = TextPretrainConfig(vocab_size=300, text_dim=32, text_heads=2, text_ff_dim=64)
    cfg = replace(cfg, train=small)
    encoder, tokenizer, result = pretrain_text_encoder(texts, cfg)
    first, last = result.curve[0]["loss"], result.curve[-1]["loss"]
    assert last < 0.7 * first, (first, last)
    assert not any(p.requires_grad for p in encoder.parameters())

    save_text_encoder(encoder, tokenizer, tmp_path / "t5")
    loaded, loaded_tokenizer = build_text_encoder(
        DiffusionConfig(text_encoder_path=str(tmp_path / "t5"), train_text_encoder=False)
    )
    assert not any(p.requires_grad for p in loaded.parameters())
    prompts = ["a red circle in the top left", texts[0], ""]
    ours = encode_prompts(tokenizer, encoder, prompts)
    theirs = encode_prompts(loaded_tokenizer, loaded.eval(), prompts)
    assert torch.equal(ours[1], theirs[1])
    torch.testing.assert_close(ours[0], theirs[0])
