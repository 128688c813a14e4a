"""A fixed, few-second measure of this machine's speed, printed beside every timing.

These machines differ 1x-3x in speed from day to day, convolutions most, so a wall time means
little alone. The probe times, forward and backward at batch 32, the toy profile's kinds of
work: a 3x3 convolution block at 32 px (the autoencoder's first level), one at 8 px (the
U-Net's latent level) and a transformer block (the text encoder and captioner). Its layers are
fixed, never read from params, so its figures compare across commits.

    python -m ml.speed_probe
"""

import time

import torch
from torch import nn

BATCH = 32


def _conv_block(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(16, channels), nn.SiLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
    )  # fmt: skip


def _samples_per_second(module: nn.Module, batch: torch.Tensor, seconds: float) -> float:
    """Forward and backward passes of `module` on `batch`, timed for about `seconds`."""
    for _ in range(2):  # warm-up: allocations and kernel selection
        module(batch).square().mean().backward()
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        module(batch).square().mean().backward()
        done += len(batch)
    return done / elapsed


def probe(seconds: float = 1.5) -> dict[str, float]:
    """Samples/s of each probe, seeded and on the current torch thread count."""
    torch.manual_seed(0)
    work = {
        "conv_32px": (_conv_block(32), torch.randn(BATCH, 32, 32, 32)),
        "conv_8px": (_conv_block(64), torch.randn(BATCH, 64, 8, 8)),
        "transformer": (
            nn.TransformerEncoderLayer(128, 4, 256, batch_first=True),
            torch.randn(BATCH, 64, 128),
        ),
    }
    return {name: _samples_per_second(m, x, seconds) for name, (m, x) in work.items()}


def describe(figures: dict[str, float]) -> str:
    """One line: 'speed probe (samples/s, N threads): conv_32px 1234, ...'."""
    cells = ", ".join(f"{name} {value:.0f}" for name, value in figures.items())
    return f"speed probe (samples/s, {torch.get_num_threads()} threads): {cells}"


if __name__ == "__main__":
    print(describe(probe()))
