"""What the diffusion model and its student train on: batches of blended captions and the
images' cached posteriors, the denoising loss, and the sample grids that show training go."""

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import IterableDataset

from ml.data.mixed_dataset import MixedDataset
from ml.diffusion.caches import Posteriors, posteriors_for
from ml.diffusion.config import DiffusionConfig
from ml.diffusion.pipeline import TextToImagePipeline, predict_noise
from ml.stage import NO_LOG, Log
from ml.train import Streamed
from ml.viz import image_grid


def needs_corpus(cfg: DiffusionConfig) -> bool:
    return not cfg.text_encoder_path and cfg.tokenizer == "bpe"


def whole_epoch(dataset: IterableDataset) -> Iterable[dict[str, Any]]:
    """Epoch 0 of `dataset` in full, whatever this process's share of it under DDP: a pure
    function of the data, so every rank and a resumed run read the same."""
    if isinstance(dataset, MixedDataset):
        dataset = MixedDataset(dataset.manifest, rank=0, world_size=1)
    dataset.set_epoch(0)
    return dataset


def caption_corpus(dataset: IterableDataset) -> list[str]:
    """The captions of epoch 0, which the toy BPE tokenizer learns from."""
    return [example["caption"] for example in whole_epoch(dataset)]


def make_batch(
    examples: list[dict[str, Any]],
    posteriors: Posteriors,
    caption_dropout: float,
    generator: torch.Generator,
) -> tuple[list[str], torch.Tensor]:
    """(captions, the images' posterior moments); `caption_dropout` of the captions replaced by
    "", which trains the unconditional prediction that classifier-free guidance needs."""
    dropped = (torch.rand(len(examples), generator=generator) < caption_dropout).tolist()
    captions = ["" if drop else ex["caption"] for drop, ex in zip(dropped, examples, strict=True)]
    return captions, posteriors[[ex["key"] for ex in examples]]


def training_batches(
    pipe: TextToImagePipeline,
    dataset: IterableDataset,
    batch_size: int,
    caption_dropout: float,
    work: Path | None,
    log: Log = NO_LOG,
    num_workers: int = 0,
) -> Streamed:
    """Batches of `dataset` (yielding {"key", "image", "caption"}) for `make_batch`, its
    images' posteriors encoded once (`ml.diffusion.caches`, kept in `work`)."""
    # Read from the launcher's environment: asking accelerate before the training loop builds
    # its Accelerator would fix its process state too early, as a single process.
    writer = int(os.environ.get("RANK", "0")) == 0
    posteriors = posteriors_for(pipe, whole_epoch(dataset), pipe.image_size, work, log, writer)
    return Streamed(
        dataset,
        batch_size,
        lambda examples, gen: make_batch(examples, posteriors, caption_dropout, gen),
        num_workers,
    )


def diffusion_loss(
    pipe: TextToImagePipeline,
    unet: torch.nn.Module,
    text: tuple[torch.Tensor, torch.Tensor],
    moments: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """The denoising loss of one batch of posterior `moments` (`pipe.image_moments`) and its
    captions' `text` (states, mask) from `encode_prompts`: MSE between the U-Net's prediction
    and its target (the noise, or v), at uniformly drawn timesteps.

    `unet` may be the accelerate-wrapped module of `pipe`. Every random
    draw (VAE posterior sample, timesteps, noise) comes from the CPU `generator`, in that order,
    so a step's randomness does not depend on the device or on what ran before it.
    """
    device = next(unet.parameters()).device
    with torch.no_grad():
        latents = pipe.draw_latents(moments.to(device), generator).float()
    schedule = pipe.scheduler
    timesteps = torch.randint(
        0, schedule.config.num_train_timesteps, (len(latents),), generator=generator
    ).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    noisy = schedule.add_noise(latents, noise, timesteps)
    if schedule.config.prediction_type == "epsilon":
        target = noise
    else:
        target = schedule.get_velocity(latents, noise, timesteps)
    prediction = predict_noise(unet, noisy, timesteps, *text)
    return F.mse_loss(prediction.float(), target.float())


def sample_grid(pipe: TextToImagePipeline, prompts: Sequence[str], seed: int) -> Image.Image:
    """Samples for fixed prompts and seed, so grids compare across steps, each under its prompt."""
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return image_grid(pipe(list(prompts), seed=seed), cols=8, scale=4, captions=list(prompts))
