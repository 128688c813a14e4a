"""The image autoencoder (`ml.diffusion.autoencoder`) and its stage: diffusers' layout, what
training does to its loss and latents, and how it is scored."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SMALL_PARAMS
from diffusers import AutoencoderKL
from PIL import Image

from ml.config import build_config
from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.diffusion.autoencoder import (
    build_autoencoder,
    images_tensor,
    psnr,
    reconstruct,
    train_autoencoder,
)
from ml.diffusion.config import AutoencoderConfig, DiffusionConfig
from ml.diffusion.pipeline import build_pipeline
from ml.stage import Inputs, run_stage
from ml.stages import image_autoencoder, raw_pairs
from ml.train import TrainConfig

TINY = {"block_out_channels": (8, 16, 16), "norm_num_groups": 4}
SMALL = SMALL_PARAMS["image_autoencoder"]  # the CI profile's
UNET = DiffusionConfig(
    image_size=32, vocab_size=300, text_dim=16, text_layers=1, text_heads=2, text_ff_dim=32,
    block_out_channels=(8, 16), cross_attention_levels=1, norm_num_groups=4,
)  # fmt: skip
CORPUS = ["a red circle", "a blue square on the left"]


def renders(n: int, seed: int = 0) -> list[Image.Image]:
    return [s.image for s in generate(n, seed, ShapeWorldConfig(), "train")]


def test_save_and_load_round_trip_keeps_weights_and_the_scaling_factor(tmp_path: Path) -> None:
    cfg = AutoencoderConfig(**TINY)
    vae = build_autoencoder(cfg)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp_path)
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    assert loaded.config.scaling_factor == 0.5
    for (name, a), b in zip(vae.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    images = renders(3)
    rebuilt = reconstruct(loaded, images, 32)
    assert [im.size for im in rebuilt] == [(32, 32)] * 3
    # three levels halve the side twice: 32 px -> 8x8 latents of `latent_channels`
    pixels = torch.zeros(1, 3, 32, 32)
    assert loaded.encode(pixels).latent_dist.mean.shape == (1, 4, 8, 8)


def test_build_is_a_function_of_the_seed() -> None:
    a = build_autoencoder(AutoencoderConfig(**TINY))
    b = build_autoencoder(AutoencoderConfig(**TINY))
    c = build_autoencoder(AutoencoderConfig(**TINY, train=TrainConfig(seed=1)))
    first = next(iter(a.state_dict()))
    assert torch.equal(a.state_dict()[first], b.state_dict()[first])
    assert not torch.equal(a.state_dict()[first], c.state_dict()[first])


def test_training_lowers_the_loss_and_normalizes_each_latent_channel(
    one_thread: None, tmp_path: Path
) -> None:
    train = TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=2, log_every=10)
    cfg = AutoencoderConfig(**TINY, train=train)
    images = renders(64)
    vae, result = train_autoencoder(images, cfg)
    losses = [p["loss"] for p in result.curve]
    assert [p["step"] for p in result.curve] == [10, 20, 30, 40]
    assert losses[-1] < 0.8 * losses[0]
    # what a pipeline built on it feeds the U-Net: posterior samples, each channel at mean 0
    # and std 1
    vae.save_pretrained(tmp_path / "vae")
    pipe = build_pipeline(UNET, CORPUS, tmp_path / "vae")
    pixels = images_tensor(images, 32)
    with torch.no_grad():
        seen = torch.cat([
            pipe.encode_images(pixels, torch.Generator().manual_seed(seed)) for seed in range(8)
        ])  # fmt: skip
        means = pipe.vae.encode(pixels).latent_dist.mean
        shift, scale = pipe._latent_normalization()
        back = pipe.decode_latents((means - shift) * scale)
        assert torch.allclose(back, pipe.vae.decode(means).sample, atol=1e-4)
    assert seen.mean((0, 2, 3)).abs().max() < 0.05
    assert torch.allclose(seen.std((0, 2, 3)), torch.ones(4), atol=0.05)
    assert psnr(reconstruct(vae, images, 32), images) > psnr(
        reconstruct(build_autoencoder(cfg), images, 32), images
    )


def test_psnr_of_a_known_error() -> None:
    image = Image.new("RGB", (8, 8), (100, 100, 100))
    brighter = Image.new("RGB", (8, 8), (110, 110, 110))
    assert psnr([brighter], [image]) == pytest.approx(20 * torch.log10(torch.tensor(25.5)).item())
    assert psnr([image], [image]) == pytest.approx(10 * math.log10(255**2 / 1e-10))  # finite


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"split": "eval"}, "split"),
        ({"image_size": 30}, "image_size"),
        ({"norm_num_groups": 5}, "norm_num_groups"),
        ({"kl_weight": -1.0}, "kl_weight"),
    ],
)
def test_bad_config_is_named(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_config(AutoencoderConfig, values, "image_autoencoder")


def test_stage_scores_reconstructions_and_a_missing_source_is_named(tmp_path: Path) -> None:
    raw_cfg = build_config(raw_pairs.STAGE.config, SMALL_PARAMS["raw_pairs"], "raw_pairs")
    run_stage(raw_pairs.STAGE, raw_cfg, Inputs({}), tmp_path / "raw_pairs")
    stage = image_autoencoder.STAGE
    cfg = build_config(stage.config, SMALL, stage.name)
    inputs = Inputs({"raw_pairs": tmp_path / "raw_pairs"})
    result = run_stage(stage, cfg, inputs, tmp_path / "vae")
    assert {"psnr", "oracle_overall_accuracy", "oracle_counting_accuracy"} <= set(result.metrics)
    assert result.metrics["oracle_single_object_n"] == 2  # prompts_per_category
    assert [p["step"] for p in result.curves["loss"]] == [2, 4]
    assert result.metadata["latent_shape"] == [4, 8, 8]
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["_class_name"] == "AutoencoderKL"

    # a pretrained autoencoder (here the one just trained) is copied, not trained, and scores
    # the same
    pretrained = build_config(stage.config, SMALL | {"source": str(tmp_path / "vae")}, stage.name)
    copied = run_stage(stage, pretrained, inputs, tmp_path / "copied")
    assert copied.metrics == result.metrics and copied.curves == {"loss": []}
    missing = build_config(stage.config, SMALL | {"source": str(tmp_path / "nowhere")}, stage.name)
    with pytest.raises(FileNotFoundError, match="image_autoencoder.source"):
        run_stage(stage, missing, inputs, tmp_path / "none")
