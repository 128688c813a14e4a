"""`diffusion_model`: the T5-conditioned U-Net trained on the blended training set.

Caption dropout for classifier-free guidance, an EMA of the weights, resumable checkpoints
(`ml.train`); saved in diffusers layout with the EMA weights and scored on single-object
prompt following, loaded the way users load it.

    python -m ml.stages.diffusion_model --config c.yaml --out DIR [--assets assets]
"""

from pathlib import Path

import torch

from ml.data.mixed import MixedDataset, MixManifest
from ml.diffusion.config import DiffusionConfig
from ml.diffusion.pipeline import TextToImagePipeline, build_pipeline
from ml.diffusion.training import (
    caption_corpus,
    diffusion_loss,
    make_batch,
    needs_corpus,
    sample_grid,
)
from ml.eval.oracle import score_text_to_image
from ml.stage import Inputs, Log, Stage, StageResult, main
from ml.train import Streamed, train

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
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


def run(cfg: DiffusionConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    manifest = inputs["mixed_training_set"] / MANIFEST
    dataset = MixedDataset(MixManifest.load(manifest))
    pipe = build_pipeline(cfg, caption_corpus(dataset) if needs_corpus(cfg) else ())
    pipe.set_progress_bar_config(disable=True)
    trained = [pipe.unet] + ([pipe.text_encoder] if cfg.train_text_encoder else [])
    pipe.to(DEVICE)

    def loss_fn(modules: list[torch.nn.Module], batch, generator: torch.Generator) -> torch.Tensor:
        captions, pixels = batch
        text_encoder = modules[1] if cfg.train_text_encoder else pipe.text_encoder
        return diffusion_loss(pipe, modules[0], text_encoder, captions, pixels, generator)

    def after_step(step: int, ema_weights) -> None:
        if cfg.sample_every and step % cfg.sample_every == 0:
            with ema_weights():
                log.image("samples", sample_grid(pipe, SAMPLE_PROMPTS, cfg.train.seed), step)

    batches = Streamed(
        dataset,
        cfg.train.batch_size,
        lambda examples, generator: make_batch(
            examples, cfg.image_size, cfg.caption_dropout, generator
        ),
        cfg.num_workers,
    )
    log.info(f"diffusion_model: {cfg.train.steps} steps of {cfg.train.batch_size} images")
    result = train(
        trained, loss_fn, batches, cfg.train, log, inputs.checkpoints(cfg), inputs.resume,
        after_step=after_step,
    )  # fmt: skip
    if result.resumed_from is not None:
        log.info(f"resumed from the checkpoint at step {result.resumed_from}")
    pipe.save_pretrained(out)
    scores, grid = score_text_to_image(
        TextToImagePipeline.from_pretrained(out).to(DEVICE), cfg.eval
    )
    grid.save(out / GRID)
    return StageResult(
        metrics=scores,
        speed={"train_images_per_s": result.samples_per_s},
        metadata={
            "steps": result.steps,
            "resumed_from_step": result.resumed_from,
            "train_seconds": round(result.seconds, 1),
            "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in pipe.text_encoder.parameters()),
        },
        images={"prompt_following": grid},
        register=True,
    )


STAGE = Stage("diffusion_model", DiffusionConfig, ("mixed_training_set",), run, trains=True)

if __name__ == "__main__":
    main([STAGE])
