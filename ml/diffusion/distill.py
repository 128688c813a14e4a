"""Consistency distillation of the text-to-image model into a few-step student (LCM).

DALL·E 3 decodes with a 2-step consistency-distilled model (Song et al. 2023). This is latent
consistency distillation as in diffusers' LCM script, on our pipeline:

- the teacher (the diffusion model's EMA weights, frozen) takes one DDIM step with
  classifier-free guidance from t to t - k on a 50-step skeleton (`skip = 1000 / 50`);
- the student f(x_t, t, w) = c_skip(t) x_t + c_out(t) x0_pred is trained so that its answer at
  t matches the answer of a slowly moving EMA copy of itself (the target network) at t - k,
  with a pseudo-Huber loss; the boundary conditions c_skip(0) = 1, c_out(0) = 0 make f(x, 0) = x,
  which anchors the chain to the data;
- the guidance scale w is drawn per sample and fed to the student as an embedding
  (`time_cond_proj_dim`), so one student call does what cost the teacher two.

The student starts as a copy of the teacher, its guidance projection at zero, so at step 0 it
is exactly the teacher plus the boundary parametrisation. It is saved in the teacher's
layout with an `LCMScheduler`, so the same pipeline class loads and samples it.
"""

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import LCMScheduler, UNet2DConditionModel
from torch.utils.data import IterableDataset

from ml.diffusion.caches import TextStates
from ml.diffusion.config import DistillConfig
from ml.diffusion.pipeline import TextToImagePipeline, guided, predict_noise
from ml.diffusion.training import training_batches
from ml.stage import NO_LOG, Log
from ml.train import TrainResult, train

SIGMA_DATA = 0.5  # the data scale the boundary scalings assume (Karras et al., LCM)


def boundary_scalings(
    timesteps: torch.Tensor, timestep_scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) per timestep, shaped to broadcast over images; exactly (1, 0) at t = 0,
    the same scalings `LCMScheduler` samples with."""
    scaled = timesteps.float() * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


@dataclass
class NoiseSchedule:
    """x_t = alpha_t x0 + sigma_t noise, and how a model output (epsilon or v) maps back."""

    alphas_cumprod: torch.Tensor
    prediction_type: str

    @classmethod
    def of(cls, scheduler: Any, device: torch.device) -> "NoiseSchedule":
        return cls(scheduler.alphas_cumprod.to(device), scheduler.config.prediction_type)

    def alpha_sigma(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def noised(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(timesteps)
        return alpha * x0 + sigma * noise

    def x0_and_noise(
        self, output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean image and the noise that a model output at `timesteps` implies."""
        alpha, sigma = self.alpha_sigma(timesteps)
        if self.prediction_type == "epsilon":
            return (sample - sigma * output) / alpha, output
        return alpha * sample - sigma * output, alpha * output + sigma * sample


def consistency_function(
    unet: UNet2DConditionModel,
    schedule: NoiseSchedule,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    text: tuple[torch.Tensor, torch.Tensor],
    guidance: torch.Tensor,
    timestep_scaling: float,
) -> torch.Tensor:
    """f(x_t, t, w) = c_skip(t) x_t + c_out(t) x0_pred: the student's estimate of the clean
    image, equal to x_t itself at t = 0."""
    output = predict_noise(unet, sample, timesteps, *text, guidance)
    x0, _ = schedule.x0_and_noise(output, sample, timesteps)
    c_skip, c_out = boundary_scalings(timesteps, timestep_scaling)
    return c_skip * sample + c_out * x0


def build_student(teacher: UNet2DConditionModel, cfg: DistillConfig) -> UNet2DConditionModel:
    """The teacher's U-Net with a guidance input: the teacher's weights, and a zero projection
    of the guidance embedding, so the student starts out computing what the teacher does."""
    student = UNet2DConditionModel.from_config(
        teacher.config, time_cond_proj_dim=cfg.guidance_embedding_dim
    )
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not name.startswith("time_embedding.cond_proj") for name in missing):
        raise ValueError(f"teacher and student U-Nets differ: {missing=}, {unexpected=}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher.device, teacher.dtype)


def distill(
    teacher: TextToImagePipeline,
    cfg: DistillConfig,
    data: IterableDataset,
    log: Log = NO_LOG,
    work: Path | None = None,
    resume: bool = True,
) -> tuple[TextToImagePipeline, TrainResult]:
    """Distil `teacher` into a student pipeline (same layout, LCM scheduler).

    `data` is a dataset with `set_epoch` yielding {"key", "image", "caption"} (a `MixedDataset`);
    only its images (their posteriors, encoded once into `work`) and captions are used, never
    the teacher's samples. The target network (the
    student's slow EMA) is checkpointed with the student (see `ml.train.train`).
    """
    device = teacher.device
    teacher.unet.requires_grad_(False).eval()
    teacher.text_encoder.requires_grad_(False).eval()
    schedule = NoiseSchedule.of(teacher.scheduler, device)
    student = build_student(teacher.unet, cfg).train()
    target = copy.deepcopy(student).requires_grad_(False)
    skip = teacher.scheduler.config.num_train_timesteps // cfg.num_ddim_timesteps
    solver_timesteps = (torch.arange(1, cfg.num_ddim_timesteps + 1) * skip - 1).to(device)
    teacher_text = TextStates(teacher, cfg.text_cache_size)

    def loss_fn(
        modules: list[torch.nn.Module],
        batch: tuple[list[str], torch.Tensor],
        generator: torch.Generator,
    ) -> torch.Tensor:
        captions, moments = batch
        n = len(captions)
        with torch.no_grad():
            x0 = teacher.draw_latents(moments.to(device), generator).float()
            index = torch.randint(0, cfg.num_ddim_timesteps, (n,), generator=generator)
            start = solver_timesteps[index.to(device)]
            end = (start - skip).clamp(min=0)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            noisy = schedule.noised(x0, noise, start)
            scale = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(
                n, generator=generator
            )
            guidance = scale.to(device)
            # [unconditional; conditional] in one call; the conditional half pads to its own
            # longest caption, so the student reads exactly what it would read alone.
            states, mask = teacher_text([""] * n + captions)
            text = (states[n:], mask[n:])
            output = predict_noise(
                teacher.unet, torch.cat([noisy] * 2), torch.cat([start] * 2), states, mask
            )
            teacher_x0, teacher_noise = schedule.x0_and_noise(
                guided(output, guidance.view(-1, 1, 1, 1)), noisy, start
            )
            alpha, sigma = schedule.alpha_sigma(end)
            previous = alpha * teacher_x0 + sigma * teacher_noise  # one DDIM step to t - skip
            wanted = consistency_function(
                target, schedule, previous, end, text, guidance, cfg.timestep_scaling
            )
        predicted = consistency_function(
            modules[0], schedule, noisy, start, text, guidance, cfg.timestep_scaling
        )
        return (
            torch.sqrt((predicted.float() - wanted.float()) ** 2 + cfg.huber_c**2) - cfg.huber_c
        ).mean()

    def after_step(step: int, ema_weights: object) -> None:
        with torch.no_grad():
            for moving, online in zip(target.parameters(), student.parameters(), strict=True):
                moving.lerp_(online, 1 - cfg.target_ema_decay)

    batches = training_batches(teacher, data, cfg.train.batch_size, 0.0, work, log)
    result = train(
        [student], loss_fn, batches, cfg.train, log, work, resume, {"target": target}, after_step
    )
    # The teacher's noise schedule, less what only a DDPM sampler knows of (its variance).
    schedule_config = {k: v for k, v in teacher.scheduler.config.items() if k != "variance_type"}
    scheduler = LCMScheduler.from_config(
        schedule_config,
        original_inference_steps=cfg.num_ddim_timesteps,
        timestep_scaling=cfg.timestep_scaling,
    )
    # The target network is the student's EMA: the smoother of the two, and what LCM samples.
    student_pipe = TextToImagePipeline(
        target.eval(), teacher.text_encoder, teacher.tokenizer, scheduler, teacher.vae
    )
    return student_pipe, result
