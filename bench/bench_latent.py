"""Latent diffusion on the toy world, the fidelity issue's experiments: the image autoencoder
alone, and a text-to-image model trained on its latents, outside the graph.

    python bench/bench_latent.py autoencoder --out DIR [--steps 4000] [--latent-channels 16]
    python bench/bench_latent.py t2i --vae DIR --out DIR [--steps 3000] [--fixed-captions]

`autoencoder` trains on ShapeWorld's 4096 train renders (raw_pairs' seed and split) and prints
the wall time, PSNR on 512 eval renders and the oracle's per-category accuracy on the 224
held-out prompts' target scenes reconstructed. `t2i` trains on the same renders with their
ground-truth descriptive captions (the upper bound of what a captioner gives) and prints the
held-out prompt-following scores of `diffusion_model`, with 95% intervals. One JSON line each.
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
from ml.eval.oracle import PromptFollowingConfig, score_by_category, score_text_to_image
from ml.stage import ConsoleLog
from ml.stages.diffusion_model import train_model
from ml.viz import image_grid

TRAIN = list(generate(4096, 0, ShapeWorldConfig(), "train"))


class Described(IterableDataset):
    """The train renders with a ground-truth descriptive caption: a fresh one each epoch, or
    (`fixed`) the same one every epoch, as a recaptioned dataset holds one per image."""

    def __init__(self, fixed: bool = False) -> None:
        self.epoch, self.fixed = 0, fixed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = random.Random(self.epoch)
        for i in rng.sample(range(len(TRAIN)), len(TRAIN)):
            phrasing = random.Random(i) if self.fixed else rng
            caption = descriptive_caption(scene_of(TRAIN[i]), phrasing)
            yield {"image": TRAIN[i].image, "caption": caption}


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
    cfg = DiffusionConfig(
        cross_attention_levels=args.cross_attention, sample_every=0,
        train=TrainConfig(steps=args.steps, batch_size=32, lr=2e-3, warmup_steps=50,
                          ema_decay=0.995, log_every=10, checkpoint_every=args.steps),
    )  # fmt: skip
    start = time.time()
    log = ConsoleLog(args.out / "log")
    pipe, result = train_model(cfg, Described(args.fixed_captions), log, None, False, args.vae)
    wall = time.time() - start
    pipe.save_pretrained(args.out)
    scores, grid = score_text_to_image(pipe, PromptFollowingConfig(guidance_scale=args.guidance))
    grid.save(args.out / "prompt_following.png")
    return {
        "wall_s": round(wall), "images_per_s": round(result.samples_per_s, 1),
        "image_size": pipe.image_size,
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
    model.add_argument("--fixed-captions", action="store_true", help="one caption per image")
    for each in (ae, model):
        each.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = autoencoder if args.what == "autoencoder" else t2i
    print(json.dumps({"what": args.what, **run(args)}))


if __name__ == "__main__":
    main()
