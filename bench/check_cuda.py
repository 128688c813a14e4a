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

from ml.config import TrainConfig
from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.diffusion.config import DiffusionConfig, DistillConfig
from ml.diffusion.distill import distill
from ml.diffusion.pipeline import TextToImagePipeline
from ml.stages.diffusion_model import train_model


class Scenes(IterableDataset):
    def __init__(self, n: int) -> None:
        self.examples = [
            {"key": s.key, "image": s.image, "caption": s.meta["descriptive_caption"]}
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
    train = TrainConfig(
        steps=args.steps, batch_size=64, mixed_precision=args.precision, checkpoint_every=20,
        log_every=10, ema_decay=0.995,
    )  # fmt: skip
    cfg = DiffusionConfig(train=train, sample_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        pipe, result = train_model(cfg, data, work=out / "work", resume=False)
        pipe.save_pretrained(out / "teacher")
        print(
            f"train: {result.steps} steps at batch {train.batch_size}, mixed precision "
            f"{train.mixed_precision}, {result.samples_per_s:.0f} images/s, final loss "
            f"{result.final_loss:.4f}, finite: {torch.isfinite(torch.tensor(result.final_loss))}"
        )
        _, resumed = train_model(cfg, data, work=out / "work")
        print(f"rerun resumes from step {resumed.resumed_from} (checkpoints on CUDA)")

        teacher = TextToImagePipeline.from_pretrained(out / "teacher").to("cuda")
        student_cfg = DistillConfig(train=TrainConfig(steps=20, batch_size=64))
        student, distilled = distill(teacher, student_cfg, data)
        student.save_pretrained(out / "student")
        print(f"distill: 20 steps, {distilled.samples_per_s:.0f} images/s")

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
