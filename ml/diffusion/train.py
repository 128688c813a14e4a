"""Train the text-to-image model on the blended training set, resumably.

An explicit loop in the style of diffusers' example scripts: `accelerate.Accelerator` (DDP,
mixed precision on GPUs), AdamW with the project's warmup + cosine schedule (`ml.train`),
gradient clipping, caption dropout for classifier-free guidance and an EMA of the weights.
It cannot use `ml.train.train` because that loop knows nothing of accelerate, checkpoints or
EMA.

Resuming is exact: a run killed at any moment and resumed from its last checkpoint ends with
the same weights as an uninterrupted run. Every random draw of step s (caption-dropout mask,
timesteps, noise, VAE posterior sample) comes from a generator seeded with (seed, s, rank),
and the data order is a pure function of (seed, epoch, position) (`BlendedDataset`), so a
checkpoint only needs the weights, optimizer, LR schedule, EMA and each rank's data position.
Checkpoints are written to a temporary folder and renamed, so a kill mid-write leaves the
previous checkpoint intact.

Run it with `python -m ml.diffusion.train --manifest M --out O` (or through `accelerate
launch` / `torchrun` for several processes).
"""

import argparse
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset

from ml.data.mixed import BlendedDataset, MixManifest
from ml.diffusion.config import DiffusionConfig
from ml.diffusion.pipeline import TextToImagePipeline, build_pipeline, encode_prompts, predict_noise
from ml.train import TrainConfig, lr_lambda
from ml.viz import image_grid

# Receives float metrics ("loss", "lr", "images_per_s", "grad_norm") and, every
# `sample_every` steps, the EMA model's sample grid under "samples".
LogFn = Callable[[int, dict[str, float | Image.Image]], None]
CHECKPOINTS = "checkpoints"
PIPELINE = "pipeline"
# Config fields a resumed run may change: they only decide what gets logged or saved, when.
CADENCE_FIELDS = {"log_every", "sample_every", "checkpoint_every", "keep_checkpoints"}


def _no_log(step: int, record: dict[str, float | Image.Image]) -> None:
    pass


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image as a (3, size, size) float tensor in [-1, 1]."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator for every random draw of one step on one rank."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)


class ExampleStream:
    """Endless examples from a dataset with `set_epoch`, in its order, from a saved position.

    The position is (epoch, examples of that epoch already taken). Resuming re-reads and skips
    the taken part of the epoch: cheap for toy data; for large shards a dataset that can start
    mid-epoch would be the next step.
    """

    def __init__(self, dataset: IterableDataset, num_workers: int, epoch: int, offset: int):
        self.dataset = dataset
        self.num_workers = num_workers
        self.epoch = epoch
        self.offset = offset
        self._examples = self._iterate()

    def take(self, n: int) -> list[dict[str, Any]]:
        return [next(self._examples) for _ in range(n)]

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

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


# --- checkpoints ------------------------------------------------------------------------------


def checkpoint_steps(out_dir: Path) -> list[int]:
    """Steps of the complete checkpoints under `out_dir`, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*") if p.is_dir())


def _save_ema(ema: EMAModel, directory: Path) -> None:
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file(
        {f"shadow.{i}": p.contiguous() for i, p in enumerate(shadow)}, directory / "ema.safetensors"
    )
    (directory / "ema.json").write_text(json.dumps(state))


def _load_ema(ema: EMAModel, directory: Path, device: torch.device) -> None:
    tensors = load_file(directory / "ema.safetensors", device=str(device))
    state = json.loads((directory / "ema.json").read_text())
    ema.load_state_dict(
        state | {"shadow_params": [tensors[f"shadow.{i}"] for i in range(len(tensors))]}
    )


def save_checkpoint(
    accelerator: Accelerator,
    cfg: DiffusionConfig,
    ema: EMAModel,
    stream: ExampleStream,
    step: int,
    out_dir: Path,
) -> None:
    """`checkpoints/step-N`: accelerate's state (weights, optimizer, LR schedule, RNG), the EMA,
    the config and each rank's data position; complete or absent, the last
    `keep_checkpoints` kept."""
    root = out_dir / CHECKPOINTS
    temp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    position = stream.position() | {"step": step}
    (temp / f"data-{accelerator.process_index}.json").write_text(json.dumps(position))
    if accelerator.is_main_process:
        _save_ema(ema, temp)
        cfg.save(temp / "config.json")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        temp.rename(root / f"step-{step}")
        for old in checkpoint_steps(out_dir)[: -cfg.keep_checkpoints]:
            shutil.rmtree(root / f"step-{old}")
    accelerator.wait_for_everyone()


def _check_resumable(cfg: DiffusionConfig, directory: Path) -> None:
    saved = DiffusionConfig.load(directory / "config.json").to_dict()
    changed = sorted(
        k for k, v in cfg.to_dict().items() if saved[k] != v and k not in CADENCE_FIELDS
    )
    if changed:
        raise ValueError(
            f"cannot resume from {directory}: the config changed in {changed}; "
            "use another out_dir or resume=None to start over"
        )


def save_pipeline(pipe: TextToImagePipeline, directory: Path) -> None:
    """Writes the pipeline next to `directory` and renames it into place."""
    temp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(temp, ignore_errors=True)
    pipe.save_pretrained(temp)
    shutil.rmtree(directory, ignore_errors=True)
    temp.rename(directory)


# --- training ---------------------------------------------------------------------------------


def _dataset(data: str | Path | IterableDataset) -> IterableDataset:
    """A manifest path becomes the blended dataset of this process's rank."""
    if isinstance(data, IterableDataset):
        return data
    return BlendedDataset(MixManifest.load(Path(data)))


def needs_corpus(cfg: DiffusionConfig) -> bool:
    return not cfg.text_encoder_path and cfg.tokenizer == "bpe"


def caption_corpus(dataset: IterableDataset) -> list[str]:
    """The captions of epoch 0, which the toy BPE tokenizer learns from: a pure function of the
    data, so a resumed run rebuilds the same vocabulary, and every DDP rank reads all of it."""
    if isinstance(dataset, BlendedDataset):
        dataset = BlendedDataset(dataset.manifest, rank=0, world_size=1, s3=dataset.s3)
    dataset.set_epoch(0)
    return [example["caption"] for example in dataset]


def make_batch(
    examples: list[dict[str, Any]],
    image_size: int,
    caption_dropout: float,
    generator: torch.Generator,
) -> tuple[list[str], torch.Tensor]:
    """(captions, pixels in [-1, 1]); `caption_dropout` of the captions replaced by "", which
    trains the unconditional prediction that classifier-free guidance needs."""
    dropped = (torch.rand(len(examples), generator=generator) < caption_dropout).tolist()
    captions = ["" if drop else ex["caption"] for drop, ex in zip(dropped, examples, strict=True)]
    return captions, torch.stack([to_tensor(ex["image"], image_size) for ex in examples])


def diffusion_loss(
    pipe: TextToImagePipeline,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    captions: list[str],
    pixels: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """The denoising loss of one batch: MSE between the U-Net's prediction and its target (the
    noise, or v), at uniformly drawn timesteps.

    `unet` and `text_encoder` may be the accelerate-wrapped modules of `pipe`. Every random
    draw (VAE posterior sample, timesteps, noise) comes from the CPU `generator`, in that order,
    so a step's randomness does not depend on the device or on what ran before it.
    """
    device = next(unet.parameters()).device
    with torch.no_grad():
        latents = pipe.encode_images(pixels.to(device), generator).float()
    schedule = pipe.scheduler
    timesteps = torch.randint(
        0, schedule.config.num_train_timesteps, (len(captions),), generator=generator
    ).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    noisy = schedule.add_noise(latents, noise, timesteps)
    if schedule.config.prediction_type == "epsilon":
        target = noise
    else:
        target = schedule.get_velocity(latents, noise, timesteps)
    trains_text = any(p.requires_grad for p in text_encoder.parameters())
    with torch.set_grad_enabled(trains_text):
        text_states, text_mask = encode_prompts(pipe.tokenizer, text_encoder, captions)
    prediction = predict_noise(unet, noisy, timesteps, text_states, text_mask)
    return F.mse_loss(prediction.float(), target.float())


def train_diffusion(
    cfg: DiffusionConfig,
    data: str | Path | IterableDataset,
    out_dir: Path,
    log: LogFn = _no_log,
    resume: str | None = "latest",
    sample_prompts: Sequence[str] = (),
    max_steps_this_run: int | None = None,
) -> dict[str, Any]:
    """Train for `cfg.steps` steps on `data` and save the EMA model to `out_dir/pipeline`.

    `data` is a `MixManifest` JSON path or a dataset with `set_epoch` that yields {"image": PIL,
    "caption": str, ...} (e.g. a `BlendedDataset`). `resume="latest"` continues from the
    newest checkpoint in `out_dir` if there is one (refusing one written with another
    config); `resume=None` starts over and deletes `out_dir`'s checkpoints.
    `max_steps_this_run` stops early after that many steps (a checkpoint is written first),
    for time-sliced jobs and tests. Returns run statistics.
    """
    if resume not in ("latest", None):
        raise ValueError(f"resume must be 'latest' or None, got {resume!r}")
    out_dir = Path(out_dir)
    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision if on_gpu else "no",  # CPUs gain nothing from it
        cpu=not on_gpu,
        step_scheduler_with_optimizer=False,  # one LR step per optimizer step, at any scale
    )
    if resume is None and accelerator.is_main_process:
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    accelerator.wait_for_everyone()

    dataset = _dataset(data)
    pipe = build_pipeline(cfg, caption_corpus(dataset) if needs_corpus(cfg) else ())
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    trained = [pipe.unet] + ([pipe.text_encoder] if cfg.train_text_encoder else [])
    params = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule))
    *models, optimizer, lr_scheduler = accelerator.prepare(*trained, optimizer, lr_scheduler)
    unet = models[0]
    text_encoder = models[1] if cfg.train_text_encoder else pipe.text_encoder
    ema = EMAModel(params, decay=cfg.ema_decay)

    start_step, epoch, offset = 0, 0, 0
    steps_done = checkpoint_steps(out_dir) if resume == "latest" else []
    if steps_done:
        directory = out_dir / CHECKPOINTS / f"step-{steps_done[-1]}"
        _check_resumable(cfg, directory)
        accelerator.load_state(str(directory))
        _load_ema(ema, directory, accelerator.device)
        position = json.loads((directory / f"data-{accelerator.process_index}.json").read_text())
        start_step, epoch, offset = position["step"], position["epoch"], position["offset"]
    stream = ExampleStream(dataset, cfg.num_workers, epoch, offset)

    end_step = cfg.steps
    if max_steps_this_run is not None:
        end_step = min(cfg.steps, start_step + max_steps_this_run)
    losses: list[float] = []
    step_logged = start_step
    window_seconds, total_seconds = 0.0, 0.0
    for module in trained:
        module.train()
    for step in range(start_step, end_step):
        started = time.perf_counter()
        generator = step_generator(cfg.seed, step, accelerator.process_index)
        captions, pixels = make_batch(
            stream.take(cfg.batch_size), cfg.image_size, cfg.caption_dropout, generator
        )
        with accelerator.autocast():
            loss = diffusion_loss(pipe, unet, text_encoder, captions, pixels, generator)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        losses.append(loss.item())
        window_seconds += time.perf_counter() - started

        done = step + 1
        if done % cfg.log_every == 0 or done == end_step:
            images = cfg.batch_size * accelerator.num_processes * (done - step_logged)
            log(done, {
                "loss": sum(losses[step_logged - start_step :]) / (done - step_logged),
                "lr": lr_scheduler.get_last_lr()[0],
                "images_per_s": images / window_seconds,
                "grad_norm": float(grad_norm),
            })  # fmt: skip
            step_logged, total_seconds, window_seconds = done, total_seconds + window_seconds, 0.0
        if sample_prompts and cfg.sample_every and done % cfg.sample_every == 0:
            if accelerator.is_main_process:
                log(done, {"samples": sample_grid(pipe, ema, params, sample_prompts, cfg.seed)})
            for module in trained:
                module.train()
        if done % cfg.checkpoint_every == 0 or done == end_step:
            save_checkpoint(accelerator, cfg, ema, stream, done, out_dir)

    finished = end_step == cfg.steps
    if finished and accelerator.is_main_process:
        ema.copy_to(params)  # the training weights stay in the checkpoint
        save_pipeline(pipe, out_dir / PIPELINE)
    accelerator.wait_for_everyone()
    images_trained = len(losses) * cfg.batch_size * accelerator.num_processes
    return {
        "steps": end_step,
        "finished": finished,
        "resumed_from": start_step if steps_done else None,
        "final_loss": losses[-1] if losses else float("nan"),
        "images_per_s": images_trained / total_seconds if total_seconds else 0.0,
        "seconds": total_seconds,
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in pipe.text_encoder.parameters()),
        "pipeline": str(out_dir / PIPELINE) if finished else None,
    }


@torch.no_grad()
def sample_grid(
    pipe: TextToImagePipeline,
    ema: EMAModel,
    params: list[torch.nn.Parameter],
    prompts: Sequence[str],
    seed: int,
) -> Image.Image:
    """Samples of the EMA weights for fixed prompts and seed, so grids compare across steps."""
    ema.store(params)
    ema.copy_to(params)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    images = pipe(list(prompts), seed=seed)
    ema.restore(params)
    return image_grid(images, cols=8, scale=4)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, type=Path, help="mixed_training_set JSON")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", type=Path, help="DiffusionConfig JSON; defaults otherwise")
    parser.add_argument("--resume", choices=["latest", "none"], default="latest")
    parser.add_argument("--sample-prompt", action="append", default=[], dest="sample_prompts")
    args = parser.parse_args(argv)
    cfg = DiffusionConfig.load(args.config) if args.config else DiffusionConfig()

    def log(step: int, record: dict[str, float | Image.Image]) -> None:
        """Metrics as JSON lines on stdout, sample grids as `out/samples/step-N.png`."""
        metrics = {k: v for k, v in record.items() if not isinstance(v, Image.Image)}
        if metrics:
            print(json.dumps({"step": step} | metrics), flush=True)
        for name, value in record.items():
            if isinstance(value, Image.Image):
                (args.out / "samples").mkdir(parents=True, exist_ok=True)
                value.save(args.out / "samples" / f"{name}-step-{step}.png")

    resume = None if args.resume == "none" else "latest"
    stats = train_diffusion(cfg, args.manifest, args.out, log, resume, args.sample_prompts)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
