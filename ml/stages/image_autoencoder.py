"""`image_autoencoder`: the VAE whose latents the text-to-image model denoises.

A pretrained `AutoencoderKL` from a local folder (Stable Diffusion's on a real profile), or
(toy) one trained on raw_pairs' renders of `split`, which the text-to-image model is never
scored on. Scored on the eval split by reconstruction PSNR and by the prompt-following
oracle's per-category accuracy on reconstructions of the held-out prompts' target scenes: what
the autoencoder loses, no text-to-image model drawn through it can get back.

    python -m ml.stages.image_autoencoder --config c.yaml --out DIR [--assets assets]
"""

import json
from pathlib import Path

from ml.diffusion.config import AutoencoderConfig
from ml.stage import Inputs, Log, Stage, StageResult, main

PREVIEW = 8  # eval images shown above their reconstructions


def run(cfg: AutoencoderConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    from diffusers import AutoencoderKL

    from ml.data.raw_pairs import load_split
    from ml.data.shapeworld import Scene, render
    from ml.diffusion.autoencoder import images_tensor, psnr, reconstruct, train_autoencoder
    from ml.diffusion.pipeline import existing_dir, to_pil
    from ml.eval.oracle import score_by_category
    from ml.viz import image_grid

    raw = inputs["raw_pairs"]
    if cfg.source == "toy":
        samples = load_split(raw, cfg.split)
        log.info(f"image_autoencoder: {cfg.train.steps} steps on {len(samples)} renders")
        vae, trained = train_autoencoder(
            [s.image for s in samples], cfg, log, inputs.checkpoints(cfg), inputs.resume
        )
        curves = {"loss": trained.curve}
    else:
        vae = AutoencoderKL.from_pretrained(existing_dir(cfg.source, "image_autoencoder.source"))
        curves = {"loss": []}  # pretrained here: no curve
    vae.save_pretrained(out)
    vae = AutoencoderKL.from_pretrained(out).eval()

    held_out = [s.image for s in load_split(raw, "eval")[: cfg.eval_images]]
    references = to_pil(images_tensor(held_out, cfg.image_size))  # as the U-Net's data sees them
    rebuilt = reconstruct(vae, held_out, cfg.image_size)
    metrics = {"psnr": psnr(rebuilt, references)}
    prompts_file = raw / "prompts.json"
    if prompts_file.is_file():  # ShapeWorld's held-out prompts, with their target scenes
        prompts = json.loads(prompts_file.read_text())
        scenes = [render(Scene.from_dict(p["scene"]), cfg.image_size) for p in prompts]
        scores = score_by_category(reconstruct(vae, scenes, cfg.image_size), prompts)
        metrics |= {f"oracle_{name}": value for name, value in scores.items()}
    side = cfg.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    grid = image_grid(references[:PREVIEW] + rebuilt[:PREVIEW], cols=PREVIEW, scale=4)
    return StageResult(
        metrics=metrics,
        metadata={
            "source": cfg.source,
            "latent_shape": [vae.config.latent_channels, side, side],
            "scaling_factor": round(vae.config.scaling_factor, 5),
            "latents_std": [round(v, 3) for v in vae.config.latents_std or ()],
            "parameters": sum(p.numel() for p in vae.parameters()),
        },
        images={"reconstructions": grid},
        curves=curves,
    )


STAGE = Stage("image_autoencoder", AutoencoderConfig, ("raw_pairs",), run, trains=True)

if __name__ == "__main__":
    main([STAGE])
