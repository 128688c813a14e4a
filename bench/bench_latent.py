"""Latent diffusion on the toy world, the fidelity issue's experiments: the image autoencoder
alone, and a text-to-image model trained on its latents, outside the graph.

    python bench/bench_latent.py autoencoder --out DIR [--steps 4000] [--latent-channels 16]
    python bench/bench_latent.py t2i --vae DIR --out DIR [--steps 3000] [--captions fresh]
        [--text-encoder DIR]

`autoencoder` trains on ShapeWorld's 4096 train renders (raw_pairs' seed and split) and prints
the wall time, PSNR on 512 eval renders and the oracle's per-category accuracy on the 224
held-out prompts' target scenes reconstructed. `t2i` trains `diffusion_model`'s recipe on the
same renders conditioned on their ground truth: `fresh`, a descriptive caption phrased anew each
epoch (the upper bound of what a captioner gives); `fixed`, one per image, as a recaptioned
dataset holds; `structured`, the scene graph as tokens (background, then colour, shape, size
and cell of each object: the upper bound of what the U-Net draws at this budget, with no
language to learn). The text encoder is trained with the U-Net, or with `--text-encoder` the
T5 folder given, frozen (`bench/bench_text_encoder.py` pretrains one). It prints the held-out
prompts' scores (the 224 of 7 categories, each asked in the model's own conditioning),
single-object colour / position from the "position" ones, with 95% intervals. One JSON line
each, after the speed probe.
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from ml.config import TrainConfig
from ml.data.shapeworld import (
    Scene,
    ShapeWorldConfig,
    descriptive_caption,
    eval_prompts,
    generate,
    render,
    scene_of,
)
from ml.diffusion.autoencoder import images_tensor, psnr, reconstruct, train_autoencoder
from ml.diffusion.config import AutoencoderConfig, DiffusionConfig
from ml.diffusion.pipeline import to_pil
from ml.eval.oracle import (
    descriptive_prompt,
    in_batches,
    score_by_category,
    score_prompt_following,
)
from ml.speed_probe import describe, probe
from ml.stage import ConsoleLog
from ml.stages.diffusion_model import train_model
from ml.viz import image_grid

TRAIN = list(generate(4096, 0, ShapeWorldConfig(), "train"))


def structured(scene: Scene) -> str:
    """The scene graph as tokens a BPE tokenizer keeps whole: "gray plain | red circle large
    top_left | ... | word CAT"."""
    parts = [f"{scene.background} {scene.texture}"]
    parts += [f"{o.color} {o.shape} {o.size} {o.position.replace(' ', '_')}" for o in scene.objects]
    return " | ".join(parts + ([f"word {scene.word}"] if scene.word else []))


class Conditioned(IterableDataset):
    """The train renders with their ground truth as `captions` says (see the module's doc)."""

    def __init__(self, captions: str) -> None:
        self.epoch, self.captions = 0, captions

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = random.Random(self.epoch)
        for i in rng.sample(range(len(TRAIN)), len(TRAIN)):
            scene = scene_of(TRAIN[i])
            if self.captions == "structured":
                caption = structured(scene)
            else:
                caption = descriptive_caption(
                    scene, random.Random(i) if self.captions == "fixed" else rng
                )
            yield {"key": TRAIN[i].key, "image": TRAIN[i].image, "caption": caption}


def held_out_scores(pipe, captions: str, guidance: float) -> dict[str, float]:
    """Every held-out category and single-object colour / position, asked in the conditioning
    the model was trained on."""
    prompts = eval_prompts(1, 32)
    texts = [
        structured(Scene.from_dict(p["scene"])) if captions == "structured"
        else descriptive_prompt(p, 1)
        for p in prompts
    ]  # fmt: skip
    images = in_batches(lambda batch: pipe(batch, 25, guidance, seed=1), texts)
    scores = score_by_category(images, prompts)
    single = [i for i, p in enumerate(prompts) if p["category"] == "position"]
    scenes = [Scene.from_dict(prompts[i]["scene"]) for i in single]
    one = score_prompt_following([images[i] for i in single], scenes)
    scores |= {f"single_{k}": v for k, v in one.items() if k.startswith(("color", "position"))}
    return scores


def autoencoder(args: argparse.Namespace) -> dict:
    cfg = AutoencoderConfig(
        latent_channels=args.latent_channels,
        train=TrainConfig(steps=args.steps, batch_size=32, lr=args.lr, warmup_steps=50,
                          log_every=50, checkpoint_every=args.steps),
    )  # fmt: skip
    start = time.time()
    log = ConsoleLog(args.out / "log")
    vae, result = train_autoencoder([s.image for s in TRAIN], cfg, log, resume=False)
    wall = time.time() - start
    vae.save_pretrained(args.out)
    vae.eval()
    held_out = [s.image for s in generate(512, 0, ShapeWorldConfig(), "eval")]
    prompts = eval_prompts(1, 32)
    scenes = [render(Scene.from_dict(p["scene"]), 32) for p in prompts]
    rebuilt = reconstruct(vae, scenes, 32)
    image_grid(scenes[::14] + rebuilt[::14], cols=16, scale=4).save(args.out / "grid.png")
    scores = score_by_category(rebuilt, prompts)
    return {
        "wall_s": round(wall), "final_loss": round(result.final_loss, 4),
        "psnr": round(psnr(reconstruct(vae, held_out, 32), to_pil(images_tensor(held_out, 32))), 2),
        **{k.removesuffix("_accuracy"): round(v, 3) for k, v in scores.items()
           if k.endswith("_accuracy")},
    }  # fmt: skip


def t2i(args: argparse.Namespace) -> dict:
    frozen = {"text_encoder_path": str(args.text_encoder), "train_text_encoder": False}
    cfg = DiffusionConfig(
        **(frozen if args.text_encoder else {}),
        cross_attention_levels=args.cross_attention, sample_every=0,
        train=TrainConfig(steps=args.steps, batch_size=32, lr=2e-3, warmup_steps=50,
                          ema_decay=0.995, log_every=10, checkpoint_every=args.steps),
    )  # fmt: skip
    start = time.time()
    log = ConsoleLog(args.out / "log")
    pipe, result = train_model(cfg, Conditioned(args.captions), log, None, False, args.vae)
    wall = time.time() - start
    pipe.save_pretrained(args.out)
    scores = held_out_scores(pipe, args.captions, args.guidance)
    return {
        "captions": args.captions, "text_encoder": str(args.text_encoder or "joint"),
        "steps": args.steps, "wall_s": round(wall),
        "images_per_s": round(result.samples_per_s, 1), "image_size": pipe.image_size,
        **{k: round(v, 3) for k, v in scores.items() if k.endswith(("_accuracy", "_low", "_high"))},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ae = sub.add_parser("autoencoder")
    ae.add_argument("--steps", type=int, default=4000)
    ae.add_argument("--lr", type=float, default=1e-3)
    ae.add_argument("--latent-channels", type=int, default=16)
    model = sub.add_parser("t2i")
    model.add_argument("--vae", type=Path, required=True)
    model.add_argument("--steps", type=int, default=3000)
    model.add_argument("--cross-attention", type=int, default=3)
    model.add_argument("--guidance", type=float, default=3.0)
    model.add_argument("--captions", choices=("fresh", "fixed", "structured"), default="fresh")
    model.add_argument("--text-encoder", type=Path, help="a T5 folder, frozen (default: joint)")
    for each in (ae, model):
        each.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(describe(probe()))
    run = autoencoder if args.what == "autoencoder" else t2i
    print(json.dumps({"what": args.what, **run(args)}))


if __name__ == "__main__":
    main()
