"""The image autoencoder of latent diffusion: diffusers' `AutoencoderKL`, built from
`AutoencoderConfig` and trained with the one loop on ShapeWorld renders, or loaded pretrained.

Saved in diffusers' layout, so `AutoencoderKL.from_pretrained(dir)` loads it and the
text-to-image pipeline keeps it as its `vae/`.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch.nn import functional as F

from ml.diffusion.config import AutoencoderConfig
from ml.diffusion.pipeline import to_pil, to_tensor
from ml.stage import NO_LOG, Log
from ml.train import Shuffled, TrainResult, train


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    """A fresh toy autoencoder; its weights a function of `cfg.train.seed` alone."""
    levels = len(cfg.block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=cfg.block_out_channels,
            layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups,
            sample_size=cfg.image_size,
        )


def autoencoder_loss(
    vae: torch.nn.Module, pixels: torch.Tensor, generator: torch.Generator, kl_weight: float
) -> torch.Tensor:
    """L1 reconstruction of a posterior sample, plus `kl_weight` x the KL to a unit Gaussian
    per latent element. `vae` may be the accelerate-wrapped module."""
    module = getattr(vae, "module", vae)
    posterior = module.encode(pixels).latent_dist
    reconstruction = module.decode(posterior.sample(generator)).sample
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return F.l1_loss(reconstruction, pixels) + kl_weight * kl


def images_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Images as one (n, 3, size, size) tensor in [-1, 1]."""
    return torch.stack([to_tensor(image, size) for image in images])


def train_autoencoder(
    images: Sequence[Image.Image],
    cfg: AutoencoderConfig,
    log: Log = NO_LOG,
    work: Path | None = None,
    resume: bool = True,
) -> tuple[AutoencoderKL, TrainResult]:
    """A toy autoencoder trained on `images`, with the per-channel mean and std of their latents
    in its config (`latents_mean`, `latents_std`, as SDXL's VAEs carry them), so the U-Net sees
    every latent channel at zero mean and unit variance: one global scale left the channels'
    std 0.5-2.9 apart, and the low-variance ones weigh little in the denoising loss."""
    if cfg.source != "toy":
        raise ValueError(f"AutoencoderConfig.source must be 'toy' to train, got {cfg.source!r}")
    pixels = images_tensor(images, cfg.image_size)
    vae = build_autoencoder(cfg)
    batches = Shuffled(
        len(pixels), cfg.train.batch_size, cfg.train.seed, lambda index, _: pixels[index]
    )
    result = train(
        [vae],
        lambda modules, batch, generator: autoencoder_loss(
            modules[0], batch.to(vae.device), generator, cfg.kl_weight
        ),
        batches,
        cfg.train,
        log,
        work,
        resume,
    )
    mean, std = latent_stats(vae, pixels)
    vae.register_to_config(scaling_factor=1.0, latents_mean=mean, latents_std=std)
    return vae, result


@torch.no_grad()
def latent_stats(
    vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 256
) -> tuple[list[float], list[float]]:
    """Per latent channel, the mean and standard deviation of the posterior samples of `pixels`
    (what the U-Net trains on): the spread of the posterior means plus the posteriors' own
    variance, which dominates in a barely trained autoencoder."""
    posteriors = [
        vae.encode(pixels[i : i + batch_size].to(vae.device)).latent_dist
        for i in range(0, len(pixels), batch_size)
    ]
    means = torch.cat([p.mean.cpu() for p in posteriors])
    noise = torch.cat([p.var.cpu() for p in posteriors]).mean((0, 2, 3))
    spread = means.var((0, 2, 3), unbiased=False)
    return means.mean((0, 2, 3)).tolist(), (spread + noise).sqrt().tolist()


@torch.no_grad()
def reconstruct(
    vae: AutoencoderKL, images: Sequence[Image.Image], size: int, batch_size: int = 256
) -> list[Image.Image]:
    """Each image encoded to its posterior mean and decoded, as a `size`-px image."""
    pixels = images_tensor(images, size)
    out: list[Image.Image] = []
    for i in range(0, len(pixels), batch_size):
        batch = pixels[i : i + batch_size].to(vae.device, vae.dtype)
        out += to_pil(vae.decode(vae.encode(batch).latent_dist.mean).sample)
    return out


def psnr(images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    """PSNR in dB of 8-bit images against references of the same size, from the mean squared
    error over all their pixels (a lossless image would make a per-image mean infinite)."""
    errors = [
        np.mean((_pixels(image) - _pixels(reference)) ** 2)
        for image, reference in zip(images, references, strict=True)
    ]
    return float(10 * np.log10(255**2 / max(float(np.mean(errors)), 1e-10)))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)
