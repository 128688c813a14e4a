"""The posterior cache (`ml.diffusion.caches`): a cached training step equals one that
encodes its images, and the cache is encoded again whenever the autoencoder or the training
data under it changes."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_vae

from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.diffusion.autoencoder import images_tensor
from ml.diffusion.caches import (
    POSTERIORS,
    Posteriors,
    TextStates,
    encode_posteriors,
    posteriors_for,
)
from ml.diffusion.config import DiffusionConfig
from ml.diffusion.pipeline import build_pipeline, encode_prompts
from ml.diffusion.training import diffusion_loss
from ml.stage import Inputs

CFG = DiffusionConfig(
    image_size=16, vocab_size=300, text_dim=16, text_layers=1, text_heads=2, text_ff_dim=32,
    block_out_channels=(8, 16), cross_attention_levels=1, attention_head_dim=4,
    norm_num_groups=4, num_train_timesteps=100,
)  # fmt: skip
EXAMPLES = [
    {"key": s.key, "image": s.image, "caption": s.meta["descriptive_caption"]}
    for s in generate(12, 0, ShapeWorldConfig(image_size=16), "train")
]
pytestmark = pytest.mark.usefixtures("one_thread")


class Recording:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def test_a_cached_step_equals_one_that_encodes_its_images(tmp_path: Path) -> None:
    pipe = build_pipeline(CFG, [e["caption"] for e in EXAMPLES], tiny_vae(tmp_path, 0))
    cache = encode_posteriors(pipe, EXAMPLES, 16, batch_size=5)  # batches unlike the step's
    batch = EXAMPLES[7:1:-2]
    keys, captions = [e["key"] for e in batch], [e["caption"] for e in batch]
    pixels = images_tensor([e["image"] for e in batch], 16)

    drawn = pipe.draw_latents(cache[keys], torch.Generator().manual_seed(3))
    encoded = pipe.encode_images(pixels, torch.Generator().manual_seed(3))
    torch.testing.assert_close(drawn, encoded, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(drawn, pipe.encode_images(pixels, torch.Generator().manual_seed(4)))

    text = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
    losses = [
        diffusion_loss(pipe, pipe.unet, text, moments, torch.Generator().manual_seed(9))
        for moments in (cache[keys], pipe.image_moments(pixels))
    ]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_the_cache_is_read_back_and_encoded_again_for_another_autoencoder(
    tmp_path: Path,
) -> None:
    work, log = tmp_path / "work", Recording()
    pipe = build_pipeline(CFG, [e["caption"] for e in EXAMPLES], tiny_vae(tmp_path / "a", 0))
    first = posteriors_for(pipe, EXAMPLES, 16, work, log)
    assert (work / POSTERIORS).is_file()
    assert log.lines[-1].startswith("encoded the posteriors of 12")

    again = posteriors_for(pipe, iter(()), 16, work, log)  # read: the examples are not touched
    assert log.lines[-1].startswith("read the posteriors of 12")
    assert torch.equal(again.moments, first.moments) and again.index == first.index

    other = build_pipeline(CFG, [e["caption"] for e in EXAMPLES], tiny_vae(tmp_path / "b", 1))
    fresh = posteriors_for(other, EXAMPLES, 16, work, log)
    assert "another autoencoder" in log.lines[-2]
    assert not torch.allclose(fresh.moments, first.moments)
    assert Posteriors.load(work / POSTERIORS).fingerprint == fresh.fingerprint != first.fingerprint


def test_a_changed_autoencoder_or_blend_gets_its_own_training_folder(tmp_path: Path) -> None:
    """The stage's checkpoint folder, where the cache lives, is one per input versions: a new
    autoencoder or blend starts over (a fresh cache and a retrain)."""
    versions = {"mixed_training_set": "m1", "image_autoencoder": "a1"}
    folder = Inputs({}, versions, tmp_path).checkpoints(CFG)
    for changed in ({"image_autoencoder": "a2"}, {"mixed_training_set": "m2"}):
        assert Inputs({}, versions | changed, tmp_path).checkpoints(CFG) != folder
    assert Inputs({}, dict(versions), tmp_path).checkpoints(CFG) == folder


def test_duplicate_and_unknown_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="appear twice.*'k1'"):
        Posteriors(["k1", "k2", "k1"], torch.zeros(3, 8, 2, 2), "f")
    cache = Posteriors(["k1", "k2"], torch.zeros(2, 8, 2, 2), "f")
    with pytest.raises(KeyError, match="no cached posterior for sample 'k9'"):
        cache[["k1", "k9"]]


def test_cached_text_states_give_the_step_what_encoding_the_batch_gives(tmp_path: Path) -> None:
    frozen = replace(CFG, train_text_encoder=False)
    pipe = build_pipeline(frozen, [e["caption"] for e in EXAMPLES], tiny_vae(tmp_path, 0))
    cache = TextStates(pipe, capacity=4)
    captions = [EXAMPLES[0]["caption"], "", "a red circle", EXAMPLES[0]["caption"]]
    for _ in range(2):  # encoded, then read back
        states, mask = cache(captions)
        expected_states, expected_mask = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
        assert torch.equal(mask, expected_mask)
        real = mask.bool()
        torch.testing.assert_close(states[real], expected_states[real], rtol=1e-5, atol=1e-5)
    assert len(cache.states) == 3
    moments = encode_posteriors(pipe, EXAMPLES[:4], 16).moments
    losses = [
        diffusion_loss(pipe, pipe.unet, text, moments, torch.Generator().manual_seed(2))
        for text in (cache(captions), (expected_states, expected_mask))
    ]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)

    cache(["a blue square", "a green star"])  # beyond capacity: the oldest goes
    assert len(cache.states) == 4 and "a blue square" in cache.states
    for capacity in (0, 2):  # none kept, or fewer than one batch's distinct captions
        small = TextStates(pipe, capacity)
        assert torch.equal(small(captions)[1], expected_mask)
        assert len(small.states) == capacity

    pipe.text_encoder.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        TextStates(pipe, capacity=4)
