"""The diffusion training step's throughput, before and after caching, measured in one run.

    python bench/bench_step.py [--steps 20] [--rounds 2] [--vae DIR]

Each variant trains `diffusion_model`'s model (params.yaml) for `--steps` steps on batches
streamed from a 4096-image ShapeWorld training set in shards (`MixedDataset`, as the stage
reads it), with fused AdamW; rounds alternate so a busy machine slows all alike, and the median
step counts. The autoencoder is `image_autoencoder`'s architecture with random weights (the
same FLOPs as the trained one), or the folder `--vae`.

1. uncached: each step turns its images into tensors and runs the autoencoder's encoder (main
   before the posterior cache);
2. posterior cache (`ml.diffusion.caches`), the text encoder trained jointly (main);
3. posterior cache, the text encoder frozen, its states computed each step;
4. posterior cache, the text encoder frozen, its states cached per distinct caption
   (`ml.diffusion.caches.TextStates`, filled with the epoch's captions first: the steady state);
5. as 4, with `attention_head_dim` 2 (2 heads of width 16-32, not 8 of width 4-8).
Rows 3-5 show what a frozen pretrained encoder and wider heads would add; their speed-ups over
row 1 are printed last.
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dalle3_dag.project import load_params
from ml.config import build_config
from ml.data.mixed import MixManifest
from ml.data.mixed_dataset import MixedDataset
from ml.data.recaption import recaption_shard
from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.data.shards import write_shards
from ml.diffusion.autoencoder import build_autoencoder, images_tensor
from ml.diffusion.caches import TextStates, encode_posteriors
from ml.diffusion.config import AutoencoderConfig, DiffusionConfig
from ml.diffusion.pipeline import build_pipeline, encode_prompts
from ml.diffusion.training import caption_corpus, diffusion_loss, whole_epoch
from ml.speed_probe import describe, probe
from ml.train import Streamed, fused_adamw, step_generator

VARIANTS = {
    "1 uncached (decode + encoder each step), text encoder trained": (8, True, "uncached"),
    "2 posterior cache, text encoder trained": (8, True, "posteriors"),
    "3 posterior cache, text encoder frozen": (8, False, "posteriors"),
    "4 posterior cache, frozen text states cached": (8, False, "text"),
    "5 as 4, attention_head_dim 2": (2, False, "text"),
}


def training_set(root: Path, n: int = 4096) -> MixedDataset:
    """`n` ShapeWorld renders in shards of 512, their descriptive captions as the DSC blend."""
    samples = list(generate(n, 0, ShapeWorldConfig(image_size=32), "train"))
    names = write_shards(samples, root / "shards", shard_size=512)
    captions = iter(s.meta["descriptive_caption"] for s in samples)
    shards = [str(root / "shards" / name) for name in names]
    sidecars = [str(root / "sidecars" / name.replace(".tar", ".parquet")) for name in names]
    for shard, sidecar in zip(shards, sidecars, strict=True):
        truth = {"dsc": lambda images: [next(captions) for _ in images]}
        recaption_shard(shard, Path(sidecar), truth, "truth", batch_size=512)
    MixManifest(shards, sidecars, "dsc", 0.95, 0).save(root / "manifest.json")
    return MixedDataset(MixManifest.load(root / "manifest.json"))


def stepper(
    cfg: DiffusionConfig, dataset: MixedDataset, vae: Path, heads: int, trains_text: bool, mode: str
) -> Callable[[int], float]:
    """A function running one training step of the variant and returning its seconds."""
    cfg.attention_head_dim = heads
    pipe = build_pipeline(cfg, caption_corpus(dataset), vae)
    pipe.text_encoder.requires_grad_(trains_text).train(trains_text)  # frozen: no dropout
    params = [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = fused_adamw(params, cfg.train)
    posteriors = encode_posteriors(pipe, whole_epoch(dataset), cfg.image_size)
    cached_text = TextStates(pipe, capacity=50_000) if mode == "text" else None
    if cached_text is not None:  # every caption of the epoch first: the steady state
        corpus = sorted({"", *caption_corpus(dataset)})
        for start in range(0, len(corpus), 256):
            cached_text(corpus[start : start + 256])

    def make(examples: list[dict[str, Any]], generator: torch.Generator) -> Any:
        captions = [example["caption"] for example in examples]
        if mode == "uncached":
            with torch.no_grad():
                images = images_tensor([ex["image"] for ex in examples], cfg.image_size)
                return captions, pipe.image_moments(images)
        return captions, posteriors[[example["key"] for example in examples]]

    batches = Streamed(dataset, cfg.train.batch_size, make)

    def step(index: int) -> float:
        start = time.perf_counter()
        generator = step_generator(0, index)
        captions, moments = batches(index, generator)
        if mode == "text":
            text = cached_text(captions)
        else:
            with torch.set_grad_enabled(trains_text):
                text = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
        loss = diffusion_loss(pipe, pipe.unet, text, moments, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vae", type=Path, help="an AutoencoderKL folder (default: random)")
    args = parser.parse_args()
    print(describe(probe()))
    params = load_params("diffusion_model")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = training_set(Path(tmp) / "data")
        vae = args.vae
        if vae is None:
            vae = Path(tmp) / "vae"
            ae = build_config(AutoencoderConfig, load_params("image_autoencoder"), "autoencoder")
            build_autoencoder(ae).save_pretrained(vae)
        steps = {
            name: stepper(
                build_config(DiffusionConfig, params, "diffusion_model"), dataset, vae, *v
            )
            for name, v in VARIANTS.items()
        }
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                for index in range(3 + args.steps):  # 3 warm-up steps
                    seconds = step(index)
                    if index >= 3:
                        times[name].append(seconds)
    batch = params["train"]["batch_size"]
    base = statistics.median(times[next(iter(times))])
    print(f"batch {batch}, median of {args.rounds} x {args.steps} steps per variant:")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(
            f"  {name}: {median * 1000:.0f} ms/step, {batch / median:.0f} samples/s, "
            f"{base / median:.2f}x"
        )


if __name__ == "__main__":
    main()
