"""`diffusion_model`: the T5-conditioned U-Net trained on the blended training set, in the
latent space of the `image_autoencoder` asset (latent diffusion, as the paper's model is).

Caption dropout for classifier-free guidance, an EMA of the weights, resumable checkpoints
(`ml.train`); saved in diffusers layout with the EMA weights and the autoencoder as `vae/`,
and scored on prompt following, loaded the way users load it.

    python -m ml.stages.diffusion_model --config c.yaml --out DIR [--assets assets]
"""

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml.diffusion.config import DiffusionConfig
from ml.files import replace_folder
from ml.stage import NO_LOG, Inputs, Log, Stage, StageResult, main

MANIFEST = "manifest.json"
GRID = "prompt_following.png"
# The fixed prompts whose samples show training go.
SAMPLE_PROMPTS = [
    "a red circle in the top left",
    "a blue square in the center",
    "a green triangle in the bottom right",
    "a yellow star on the left",
    "a white cross at the top",
    "a purple diamond on the right",
    "an orange circle at the bottom",
    "a black square in the top right corner",
]


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train_model(
    cfg: DiffusionConfig,
    dataset: Any,
    log: Log = NO_LOG,
    work: Path | None = None,
    resume: bool = True,
    vae_dir: Path | None = None,
    keep: Mapping[int, Path] | None = None,
) -> tuple[Any, Any]:
    """(the trained pipeline with its EMA weights, the loop's `TrainResult`) on `dataset`, a
    `MixedDataset` or any dataset with `set_epoch` yielding {"key", "image", "caption"}; in
    the latent space of the autoencoder in `vae_dir`, or in pixel space without one. `keep`
    maps steps to folders where the pipeline with that step's EMA weights is saved."""
    from ml.diffusion.caches import TextStates
    from ml.diffusion.pipeline import build_pipeline, encode_prompts
    from ml.diffusion.training import (
        caption_corpus,
        diffusion_loss,
        needs_corpus,
        sample_grid,
        training_batches,
    )
    from ml.train import rank_and_world, train

    pipe = build_pipeline(cfg, caption_corpus(dataset) if needs_corpus(cfg) else (), vae_dir)
    pipe.set_progress_bar_config(disable=True)
    trained = [pipe.unet] + ([pipe.text_encoder] if cfg.train_text_encoder else [])
    pipe.to(device())
    frozen_text = None if cfg.train_text_encoder else TextStates(pipe, cfg.text_cache_size)

    def loss_fn(modules: list[Any], batch: Any, generator: Any) -> Any:
        captions, moments = batch
        if cfg.train_text_encoder:
            text = encode_prompts(pipe.tokenizer, modules[1], captions)
        else:
            text = frozen_text(captions)
        return diffusion_loss(pipe, modules[0], text, moments, generator)

    def after_step(step: int, ema_weights: Any) -> None:
        if cfg.sample_every and step % cfg.sample_every == 0:
            with ema_weights():
                log.image("samples", sample_grid(pipe, SAMPLE_PROMPTS, cfg.train.seed), step)
        if keep and step in keep and rank_and_world()[0] == 0:  # one writer per folder
            staged = keep[step].with_name(keep[step].name + ".tmp")
            shutil.rmtree(staged, ignore_errors=True)
            with ema_weights():
                pipe.save_pretrained(staged)
            replace_folder(staged, keep[step])

    batches = training_batches(
        pipe, dataset, cfg.train.batch_size, cfg.caption_dropout, work, log, cfg.num_workers
    )
    result = train(trained, loss_fn, batches, cfg.train, log, work, resume, after_step=after_step)
    return pipe, result


def run(cfg: DiffusionConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    from ml.data.mixed import MixManifest
    from ml.data.mixed_dataset import MixedDataset
    from ml.diffusion.pipeline import TextToImagePipeline
    from ml.eval.oracle import score_text_to_image

    dataset = MixedDataset(MixManifest.load(inputs["mixed_training_set"] / MANIFEST))
    log.info(f"diffusion_model: {cfg.train.steps} steps of {cfg.train.batch_size} images")
    vae_dir = inputs["image_autoencoder"]
    pipe, result = train_model(cfg, dataset, log, inputs.checkpoints(cfg), inputs.resume, vae_dir)
    pipe.save_pretrained(out)
    saved = TextToImagePipeline.from_pretrained(out).to(device())
    scores, grid = score_text_to_image(saved, cfg.eval)
    grid.save(out / GRID)
    return StageResult(
        metrics=scores,
        speed={
            "train_images_per_s": result.samples_per_s,
            "checkpoint_share": result.checkpoint_share,
        },
        metadata={
            "steps": result.steps,
            "resumed_from_step": result.resumed_from,
            "train_seconds": round(result.seconds, 1),
            "latent_shape": [pipe.unet.config.in_channels] + [pipe.unet.config.sample_size] * 2,
            "image_size": pipe.image_size,
            "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in pipe.text_encoder.parameters()),
        },
        images={"prompt_following": grid},
        curves={"loss": result.curve},
        register=True,
    )


STAGE = Stage(
    "diffusion_model",
    DiffusionConfig,
    ("mixed_training_set", "image_autoencoder"),
    run,
    trains=True,
)

if __name__ == "__main__":
    main([STAGE])
