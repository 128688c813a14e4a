"""The one training-loop skeleton shared by every stage that trains a model.

Explicit in the style of diffusers' example scripts: AdamW, linear warmup then cosine decay,
gradient clipping, and a callback for logging, so each stage only supplies its batches and
its loss.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 25

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to 0.1 of the peak learning rate."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(
    model: torch.nn.Module,
    batches: Iterator[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    cfg: TrainConfig,
    log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
) -> list[float]:
    """Run `cfg.steps` optimizer steps of `loss_fn` over `batches`; returns the logged losses.

    Only parameters with `requires_grad` are optimized, so frozen parts (a CLIP encoder under
    a captioner) stay frozen.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model.train()
    history: list[float] = []
    running = 0.0
    for step in range(cfg.steps):
        loss = loss_fn(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = (step % cfg.log_every) + 1
            history.append(running / n)
            log(step + 1, {"loss": running / n, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": float(grad_norm)})
            running = 0.0
    model.eval()
    return history
