"""The CUDA path, checked in one short run: mixed-precision training steps of the diffusion
model, a short consistency distillation, and 2-step sampling, with their figures.

    python bench/check_cuda.py [--precision bf16] [--steps 40]

Nothing else depends on it; the test suite covers the same code on the CPU.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.diffusion.config import DiffusionConfig
from ml.diffusion.distill import DistillConfig, distill
from ml.diffusion.pipeline import TextToImagePipeline
from ml.diffusion.train import train_diffusion


class Scenes(IterableDataset):
    def __init__(self, n: int) -> None:
        self.examples = [
            {"image": s.image, "caption": s.meta["descriptive_caption"]}
            for s in generate(n, seed=0, cfg=ShapeWorldConfig(), split="cuda")
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(self.examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=["fp16", "bf16"])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    data = Scenes(1024)
    cfg = DiffusionConfig(
        steps=args.steps, batch_size=64, mixed_precision=args.precision, checkpoint_every=20,
        sample_every=0, log_every=10,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        logs: list[dict] = []
        stats = train_diffusion(cfg, data, out / "teacher", lambda s, r: logs.append(r), None)
        print(
            f"train: {stats['steps']} steps at batch {cfg.batch_size}, mixed precision "
            f"{stats['mixed_precision']}, {stats['images_per_s']:.0f} images/s, final loss "
            f"{stats['final_loss']:.4f}, all losses finite: "
            f"{all(torch.isfinite(torch.tensor(r['loss'])) for r in logs)}"
        )
        resumed = train_diffusion(cfg, data, out / "teacher")
        print(f"rerun resumes from step {resumed['resumed_from']} (checkpoints on CUDA)")

        teacher = TextToImagePipeline.from_pretrained(out / "teacher" / "pipeline").to("cuda")
        dstats = distill(teacher, DistillConfig(steps=20, batch_size=64), data, out / "student")
        print(f"distill: 20 steps, {dstats['images_per_s']:.0f} images/s")

        student = TextToImagePipeline.from_pretrained(out / "student").to("cuda")
        student.set_progress_bar_config(disable=True)
        teacher.set_progress_bar_config(disable=True)
        prompts = ["a red circle in the top left", "a blue square in the center"] * 16
        for name, pipe, steps in (("teacher", teacher, 50), ("student", student, 2)):
            pipe(prompts[:2], num_inference_steps=steps, seed=0)  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            images = pipe(prompts, num_inference_steps=steps, seed=0)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            again = pipe(prompts, num_inference_steps=steps, seed=0)
            same = all(a.tobytes() == b.tobytes() for a, b in zip(images, again, strict=True))
            print(
                f"sample {name}: {steps} steps, {len(prompts)} images in {seconds * 1000:.0f} ms, "
                f"size {images[0].size}, same images for the same seed: {same}"
            )
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
