"""The one training loop: the toy CLIP, the three captioners, diffusion and distillation run it.

Explicit in the style of diffusers' example scripts, on `accelerate` (DDP under `accelerate
launch` / `torchrun`, mixed precision on GPUs): AdamW (fused where the device has it), linear
warmup then cosine decay, gradient clipping, an optional EMA of the weights, progress through
the stage's `Log`, and checkpoints. A stage supplies its modules, its batches and its loss.

Resuming is exact: a run killed at any moment and resumed from its last checkpoint ends with
the weights of an uninterrupted run. Every random draw of step s comes from a generator seeded
with (seed, s, rank) and a stage's batches are a function of the step and a saved data
position, so a checkpoint holds the weights, optimizer, LR schedule, RNG states, EMA, extra
modules (a target network) and each rank's data position. It is written to a temporary folder
and renamed, so a kill mid-write leaves the previous checkpoint intact.
"""

import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset

from ml.config import TrainConfig
from ml.files import UnreadableFile, check_weights
from ml.stage import NO_LOG, Log

CHECKPOINTS = "checkpoints"
CURVE = "curve.json"  # the logged points so far, in each checkpoint


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to 0.1 of the peak learning rate."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator for every random draw of one step on one rank."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes, as `accelerate launch` set them."""
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


# --- batches ----------------------------------------------------------------------------------


class Batches(Protocol):
    """A stage's batches: the batch of a step, and the data position a checkpoint keeps."""

    def __call__(self, step: int, generator: torch.Generator) -> Any: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


class Shuffled:
    """Batches of an in-memory dataset of `n` items: epoch e is a permutation seeded with
    (seed, e) cut into whole global batches, each rank taking its part, so the batch of any
    step follows from the step alone and a batch never repeats an item."""

    def __init__(
        self, n: int, batch_size: int, seed: int, make: Callable[[list[int], torch.Generator], Any]
    ) -> None:
        self.rank, self.world = rank_and_world()
        self.per_epoch = n // (batch_size * self.world)
        if self.per_epoch < 1:
            raise ValueError(f"{n} items make no batch of {batch_size} on {self.world} processes")
        self.n, self.batch_size, self.seed, self.make = n, batch_size, seed, make

    def __call__(self, step: int, generator: torch.Generator) -> Any:
        epoch, index = divmod(step, self.per_epoch)
        order = torch.randperm(self.n, generator=step_generator(self.seed, epoch, rank=-1))
        start = (index * self.world + self.rank) * self.batch_size
        return self.make(order[start : start + self.batch_size].tolist(), generator)

    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


class Streamed:
    """Batches from an iterable dataset with `set_epoch` (e.g. `MixedDataset`), taken in its
    order from a saved (epoch, offset) position.

    Resuming re-reads and skips the taken part of the epoch: cheap for toy data; for large
    shards a dataset that can start mid-epoch would be the next step.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        batch_size: int,
        make: Callable[[list[dict[str, Any]], torch.Generator], Any],
        num_workers: int = 0,
    ) -> None:
        self.dataset, self.batch_size, self.make = dataset, batch_size, make
        self.num_workers = num_workers
        self.epoch, self.offset = 0, 0
        self._examples: Iterator[dict[str, Any]] | None = None

    def __call__(self, step: int, generator: torch.Generator) -> Any:
        if self._examples is None:
            self._examples = self._iterate()
        return self.make([next(self._examples) for _ in range(self.batch_size)], generator)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset, self._examples = state["epoch"], state["offset"], None

    def _iterate(self) -> Iterator[dict[str, Any]]:
        while True:
            self.dataset.set_epoch(self.epoch)
            loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)
            seen = 0
            for i, example in enumerate(loader):
                seen += 1
                if i >= self.offset:
                    self.offset = i + 1
                    yield example
            if seen == 0:
                raise ValueError(f"the training set yielded no examples in epoch {self.epoch}")
            self.epoch, self.offset = self.epoch + 1, 0


def model_loss(modules: Sequence[torch.nn.Module], batch: dict[str, torch.Tensor], _: Any) -> Any:
    """A `loss_fn` for a transformers model that computes its own loss from a batch of its
    keyword inputs, labels included (a T5 trained by teacher forcing)."""
    device = next(modules[0].parameters()).device
    return modules[0](**{k: v.to(device) for k, v in batch.items()}).loss


# --- checkpoints ------------------------------------------------------------------------------


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in `directory`, oldest first."""
    root = Path(directory) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*") if p.is_dir())


def _newest_loadable(accelerator: Any, work: Path, log: Log) -> Path | None:
    """The newest checkpoint whose every file loads safely. One that does not (truncated,
    corrupt, an unsafe pickle) is said in the log with the file and set aside as
    `checkpoints/unreadable-step-N`, and the one before it is used."""
    found, unreadable = None, []
    for step in reversed(checkpoint_steps(work)):
        directory = work / CHECKPOINTS / f"step-{step}"
        try:
            found = check_weights(directory)
            break
        except UnreadableFile as err:
            log.info(f"checkpoint step {step} is set aside: {err}")
            unreadable.append(directory)
    accelerator.wait_for_everyone()  # every rank has looked before any folder moves
    if accelerator.is_main_process:
        for directory in unreadable:
            aside = directory.with_name(f"unreadable-{directory.name}")
            shutil.rmtree(aside, ignore_errors=True)
            directory.rename(aside)
    accelerator.wait_for_everyone()
    return found


def _save_modules(modules: dict[str, torch.nn.Module], directory: Path) -> None:
    from safetensors.torch import save_file

    for name, module in modules.items():
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        save_file(state, directory / f"{name}.safetensors")


def _load_modules(modules: dict[str, torch.nn.Module], directory: Path) -> None:
    from safetensors.torch import load_file

    for name, module in modules.items():
        module.load_state_dict(load_file(directory / f"{name}.safetensors"))


@dataclass
class TrainResult:
    """How a run went; `curve` holds the logged points ({step, loss, lr}) of all its runs, a
    resumed one's included, for DVC plots. `seconds` are the steps' own; writing checkpoints
    took `checkpoint_seconds` more."""

    steps: int
    finished: bool
    resumed_from: int | None
    final_loss: float
    seconds: float
    samples_per_s: float
    processes: int
    curve: list[dict[str, float]] = field(default_factory=list)
    checkpoint_seconds: float = 0.0

    @property
    def checkpoint_share(self) -> float:
        """The share of this run's training time spent writing checkpoints."""
        total = self.seconds + self.checkpoint_seconds
        return self.checkpoint_seconds / total if total else 0.0


def fused_adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW in one fused kernel (CPU and CUDA have it in torch 2.4+), else the foreach one."""
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def train(
    modules: Sequence[torch.nn.Module],
    loss_fn: Callable[[list[torch.nn.Module], Any, torch.Generator], torch.Tensor],
    batches: Batches,
    cfg: TrainConfig,
    log: Log = NO_LOG,
    work: Path | None = None,
    resume: bool = True,
    extra: dict[str, torch.nn.Module] | None = None,
    after_step: Callable[[int, Callable[[], AbstractContextManager]], None] | None = None,
    max_steps_this_run: int | None = None,
) -> TrainResult:
    """Train the parameters of `modules` that require grad for `cfg.steps` steps.

    `loss_fn(modules, batch, generator)` gets the modules as accelerate prepared them (DDP
    wrappers under several processes). `work` is the folder of this run's checkpoints (see
    `Inputs.checkpoints`); None keeps none. `resume` continues from its newest checkpoint, else
    its checkpoints are deleted first. `extra` modules change outside the optimizer (a target
    network) and are checkpointed too. `after_step(step, ema_weights)` runs after each
    optimizer step; `with ema_weights():` swaps the EMA in. With `ema_decay`, the modules end
    holding the EMA weights. `max_steps_this_run` stops early after a checkpoint (tests,
    time-sliced jobs).
    """
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision if on_gpu else "no",
        cpu=not on_gpu,
        step_scheduler_with_optimizer=False,  # one LR step per optimizer step, at any scale
    )
    extra = extra or {}
    if work is not None and not resume and accelerator.is_main_process:
        shutil.rmtree(Path(work) / CHECKPOINTS, ignore_errors=True)
    accelerator.wait_for_everyone()

    for module in modules:
        module.to(accelerator.device).train()
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    optimizer = fused_adamw(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    *prepared, optimizer, scheduler = accelerator.prepare(*modules, optimizer, scheduler)
    ema = EMAModel(params, decay=cfg.ema_decay, foreach=True) if cfg.ema_decay else None

    start, curve = 0, []
    resumable = work is not None and resume
    directory = _newest_loadable(accelerator, Path(work), log) if resumable else None
    if directory is not None:
        accelerator.load_state(str(directory))
        _load_modules(extra, directory)
        if ema is not None:
            ema.load_state_dict(_load_ema(directory, accelerator.device))
        position = json.loads((directory / f"data-{accelerator.process_index}.json").read_text())
        start = position.pop("step")
        batches.load_state_dict(position)
        if (directory / CURVE).is_file():
            curve = json.loads((directory / CURVE).read_text())
        log.info(f"resumed from the checkpoint at step {start}")

    @contextmanager
    def ema_weights() -> Iterator[None]:
        if ema is None:
            yield
            return
        ema.store(params)
        ema.copy_to(params)
        try:
            yield
        finally:
            ema.restore(params)

    end = cfg.steps if max_steps_this_run is None else min(cfg.steps, start + max_steps_this_run)
    losses: list[float] = []
    logged, window, total_seconds, checkpoint_seconds = start, 0.0, 0.0, 0.0
    samples_per_step = cfg.batch_size * accelerator.num_processes
    for step in range(start, end):
        started = time.perf_counter()
        generator = step_generator(cfg.seed, step, accelerator.process_index)
        batch = batches(step, generator)
        with accelerator.autocast():
            loss = loss_fn(prepared, batch, generator)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())  # all ranks'
        window += time.perf_counter() - started
        done = step + 1
        if after_step is not None:
            after_step(done, ema_weights)
            for module in modules:
                module.train()
        if done % cfg.log_every == 0 or done == end:
            point = {
                "step": done,
                "loss": sum(losses[logged - start :]) / (done - logged),
                "lr": scheduler.get_last_lr()[0],
            }
            curve.append(point)
            log.metrics(done, cfg.steps, {
                "loss": point["loss"],
                "lr": point["lr"],
                "grad_norm": float(grad_norm),
                "samples_per_s": samples_per_step * (done - logged) / window,
            })  # fmt: skip
            logged, total_seconds, window = done, total_seconds + window, 0.0
        if work is not None and (done % cfg.checkpoint_every == 0 or done == end):
            saving = time.perf_counter()
            _save_checkpoint(accelerator, cfg, ema, extra, batches, done, Path(work), curve)
            checkpoint_seconds += time.perf_counter() - saving

    finished = end == cfg.steps
    if finished and ema is not None:
        ema.copy_to(params)  # the training weights stay in the checkpoint
    for module in modules:
        module.eval()
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        _check_ranks_agree(accelerator, params)
        if not accelerator.is_main_process:
            # As in diffusers' scripts, rank 0 alone saves and evaluates: the others are done.
            torch.distributed.destroy_process_group()
            sys.exit(0)
    return TrainResult(
        steps=end,
        finished=finished,
        resumed_from=start if directory is not None else None,
        final_loss=losses[-1] if losses else float("nan"),
        seconds=total_seconds,
        samples_per_s=samples_per_step * len(losses) / total_seconds if total_seconds else 0.0,
        processes=accelerator.num_processes,
        curve=curve,
        checkpoint_seconds=checkpoint_seconds,
    )


def _check_ranks_agree(accelerator: Any, params: list[torch.nn.Parameter]) -> None:
    """DDP keeps every rank's weights identical; a rank that drifted means a lost all-reduce."""
    total = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    every = accelerator.gather(total.to(accelerator.device))
    if not bool((every == every[0]).all()):
        raise RuntimeError(f"the ranks' weights differ after training: {every.tolist()}")


def _save_checkpoint(
    accelerator: Any,
    cfg: TrainConfig,
    ema: Any,
    extra: dict[str, torch.nn.Module],
    batches: Batches,
    step: int,
    work: Path,
    curve: list[dict[str, float]],
) -> None:
    """`checkpoints/step-N`, complete or absent; the newest `keep_checkpoints` kept."""
    root = work / CHECKPOINTS
    temp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    position = batches.state_dict() | {"step": step}
    (temp / f"data-{accelerator.process_index}.json").write_text(json.dumps(position))
    if accelerator.is_main_process:
        _save_modules(extra, temp)
        (temp / CURVE).write_text(json.dumps(curve))
        if ema is not None:
            _save_ema(ema, temp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(root / f"step-{step}", ignore_errors=True)
        temp.rename(root / f"step-{step}")
        for old in checkpoint_steps(work)[: -cfg.keep_checkpoints]:
            shutil.rmtree(root / f"step-{old}")
    accelerator.wait_for_everyone()


def _save_ema(ema: Any, directory: Path) -> None:
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    tensors = {f"shadow.{i}": p.detach().contiguous() for i, p in enumerate(shadow)}
    save_file(tensors, directory / "ema.safetensors")
    (directory / "ema.json").write_text(json.dumps(state))


def _load_ema(directory: Path, device: torch.device) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors = load_file(directory / "ema.safetensors", device=str(device))
    state = json.loads((directory / "ema.json").read_text())
    return state | {"shadow_params": [tensors[f"shadow.{i}"] for i in range(len(tensors))]}
