"""Text-to-image figures, each comparison measured in this one run.

    python bench/bench_diffusion.py [--teacher DIR --student DIR] [--prompts 72] [--threads 1]

1. Sampling: the teacher with 50 DDIM steps (and classifier-free guidance, two U-Net calls per
   step) against the 2-step distilled student (guidance embedded, one call per step), on the
   same prompts and seeds: seconds per image and the ratio; both models' prompt following
   (colour / position of the generated object, `ml.eval.oracle`).
2. Training throughput of our loop (`ml.train`: dataset reading, caption
   dropout, accelerate, gradient clipping, EMA, logging, a checkpoint) against a bare PyTorch
   loop on the same model and batch size (a fixed batch in memory, forward, backward, AdamW),
   alternating the two so a busy machine slows both alike; the overhead is 1 - ours / bare.

The models default to the materialized `diffusion_model` and `distilled_model` (`make run`).
"""

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from dalle3_dag.resources import StorageResource
from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.diffusion.autoencoder import images_tensor
from ml.diffusion.config import DiffusionConfig
from ml.diffusion.pipeline import TextToImagePipeline, build_pipeline, encode_prompts
from ml.diffusion.training import caption_corpus, diffusion_loss
from ml.eval.oracle import evaluate_prompt_following, single_object_prompts
from ml.speed_probe import describe, probe
from ml.stages.diffusion_model import train_model
from ml.train import step_generator


class Scenes(IterableDataset):
    """ShapeWorld samples with their descriptive captions, in memory, in a per-epoch order."""

    def __init__(self, n: int, image_size: int) -> None:
        cfg = ShapeWorldConfig(image_size=image_size)
        self.examples = [
            {"key": s.key, "image": s.image, "caption": s.meta["descriptive_caption"]}
            for s in generate(n, seed=0, cfg=cfg, split="bench")
        ]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(
            len(self.examples), generator=torch.Generator().manual_seed(self.epoch)
        )
        return (self.examples[i] for i in order.tolist())


def parse_args() -> argparse.Namespace:
    storage = StorageResource()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=storage.asset_dir("diffusion_model"))
    parser.add_argument("--student", type=Path, default=storage.asset_dir("distilled_model"))
    parser.add_argument("--prompts", type=int, default=72, help="single-object prompts")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--train-steps", type=int, default=50, help="per timed training round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating training rounds")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return parser.parse_args()


def sampling(args: argparse.Namespace) -> None:
    for path in (args.teacher, args.student):
        if not (path / "model_index.json").is_file():
            raise SystemExit(
                f"no model at {path}: run `make run` first, or pass --teacher/--student"
            )
    prompts = single_object_prompts(seed=1, n=args.prompts)
    rows = []
    for name, path, steps in (("teacher", args.teacher, 50), ("student", args.student, 2)):
        pipe = TextToImagePipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        pipe([prompts[0]["prompt"]], num_inference_steps=steps, seed=0)  # warm-up

        def generate_images(texts: list[str], pipe=pipe, steps=steps):
            return pipe(texts, num_inference_steps=steps, guidance_scale=args.guidance, seed=1)

        start = time.perf_counter()
        scores, _ = evaluate_prompt_following(generate_images, prompts)
        seconds = (time.perf_counter() - start) / len(prompts)
        rows.append((name, steps, seconds, scores))
        print(
            f"{name:8} {steps:3d} steps: {seconds * 1000:8.1f} ms/image   "
            f"colour {scores['color_accuracy']:.3f} (chance {scores['color_chance']:.3f})   "
            f"position {scores['position_accuracy']:.3f} (chance {scores['position_chance']:.3f})"
        )
    (_, _, teacher_s, teacher), (_, _, student_s, student) = rows
    print(f"sampling speed-up, student vs teacher: {teacher_s / student_s:.1f}x (target >= 20x)")
    for what in ("color", "position"):
        gap = teacher[f"{what}_accuracy"] - student[f"{what}_accuracy"]
        print(f"{what} accuracy, teacher minus student: {gap * 100:+.1f} points (target <= 10)")


def bare_loop(cfg: DiffusionConfig, dataset: Scenes, steps: int) -> float:
    """Images/s of forward + backward + AdamW on one fixed in-memory batch: nothing else."""
    pipe = build_pipeline(cfg, caption_corpus(dataset))  # the vocabulary our loop learns too
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    examples = dataset.examples[: cfg.train.batch_size]
    captions = [example["caption"] for example in examples]
    moments = pipe.image_moments(images_tensor([ex["image"] for ex in examples], cfg.image_size))
    start = time.perf_counter()
    for step in range(steps):
        generator = step_generator(cfg.train.seed, step, 0)
        text = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
        loss = diffusion_loss(pipe, pipe.unet, text, moments, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * cfg.train.batch_size / (time.perf_counter() - start)


def our_loop(cfg: DiffusionConfig, dataset: Scenes, steps: int) -> float:
    """Images/s of the stage's training end to end, timed from outside, one checkpoint
    included."""
    train = replace(cfg.train, steps=steps, checkpoint_every=steps, log_every=10)
    cfg = replace(cfg, train=train, sample_every=0)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train_model(cfg, dataset, work=Path(out), resume=False)
        return steps * cfg.train.batch_size / (time.perf_counter() - start)


def training(args: argparse.Namespace) -> None:
    cfg = DiffusionConfig()
    dataset = Scenes(1024, cfg.image_size)
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(bare_loop(cfg, dataset, args.train_steps))
        ours.append(our_loop(cfg, dataset, args.train_steps))
    bare_best, ours_best = max(bare), max(ours)
    print(
        f"training, batch {cfg.train.batch_size}, {args.train_steps} steps x {args.rounds} rounds: "
        f"bare loop {bare_best:.1f} images/s, our loop {ours_best:.1f} images/s"
    )
    print(f"orchestration overhead: {(1 - ours_best / bare_best) * 100:.1f}% (target <= 10%)")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe(probe()))
    sampling(args)
    training(args)


if __name__ == "__main__":
    main()
