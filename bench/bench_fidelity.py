"""What limits a text-to-image model's colour: the text encoder, guidance or
the sampler, each measured on one trained `diffusion_model` (the fidelity issue's step 1).

    python bench/bench_fidelity.py --model assets/diffusion_model [--prompts 72]

(The instrument itself is measured by `bench/bench_oracle.py`.)
1. The text encoder: a nearest-centroid probe of its pooled states (the U-Net's global
   condition) for colour, shape and position, fitted on one half of the single-object
   descriptive captions and tested on the other.
2. Guidance scale and 3. sampler steps: the model's colour / position / both accuracy on the
   descriptive prompts, with 95% Wilson intervals.
4. Phrasing: the same scores with every descriptive prompt written in each of
   `descriptive_caption`'s three templates, against the share of each template in a training
   set's captions (`--captions`, a recaptioned shard's sidecar), since a greedy captioner may
   write only one of them.
Prints a Markdown table per part; `--parts` picks some.
"""

import argparse
import random
import re
from pathlib import Path

import torch

from ml import speed_probe
from ml.data.shapeworld import COLORS, POSITIONS, SHAPES, Scene, SceneObject
from ml.data.shapeworld import descriptive_caption as describe
from ml.diffusion.pipeline import TextToImagePipeline, encode_prompts
from ml.eval.oracle import evaluate_prompt_following, single_object_prompts


@torch.no_grad()
def probe(pipe: TextToImagePipeline, n: int = 864, seed: int = 0) -> None:
    """Nearest-centroid accuracy of colour, shape and position from the pooled text states."""
    rng = random.Random(seed)
    scenes = [
        Scene("white", "plain", (SceneObject(rng.choice(SHAPES), rng.choice(
            [c for c in COLORS if c != "white"]), rng.choice(("small", "large")),
            rng.choice(POSITIONS)),))  # fmt: skip
        for _ in range(n)
    ]
    captions = [describe(scene, rng) for scene in scenes]
    states, mask = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
    weights = mask.unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((states * weights).sum(1) / weights.sum(1), dim=-1)
    fit, test = slice(0, n // 2), slice(n // 2, n)
    print("\n| attribute | classes | probe accuracy (held-out captions) | chance |")
    print("|---|---|---|---|")
    for attribute in ("color", "shape", "position"):
        labels = [getattr(s.objects[0], attribute) for s in scenes]
        classes = sorted(set(labels))
        index = torch.tensor([classes.index(label) for label in labels])
        centroids = torch.stack([pooled[fit][index[fit] == k].mean(0) for k in range(len(classes))])
        predicted = (pooled[test] @ centroids.T).argmax(1)
        accuracy = (predicted == index[test]).float().mean().item()
        print(f"| {attribute} | {len(classes)} | {accuracy:.3f} | {1 / len(classes):.3f} |")


def sweep(pipe: TextToImagePipeline, prompts: list[dict], settings: list[tuple]) -> None:
    print("\n| guidance | DDIM steps | colour | position | both |")
    print("|---|---|---|---|---|")
    for guidance, steps in settings:
        def generate(texts: list[str], g: float = guidance, s: int = steps) -> list:
            return pipe(texts, s, g, seed=1)

        scores, _ = evaluate_prompt_following(generate, prompts, style="descriptive")
        print(f"| {guidance} | {steps} | {interval_cells(scores)} |")


def interval_cells(scores: dict[str, float]) -> str:
    """Colour, position and both, each with its 95% Wilson interval, as table cells."""
    return " | ".join(
        f"{scores[f'{name}_accuracy']:.3f} [{scores[f'{name}_low']:.2f}, "
        f"{scores[f'{name}_high']:.2f}]"
        for name in ("color", "position", "both")
    )


TEMPLATES = ("objects first", "background first", "count first")


def template_of(caption: str) -> int:
    """Which of `descriptive_caption`'s templates wrote `caption`."""
    if ":" in caption.split(".")[0]:
        return 2
    return 1 if re.match(r"An? \w+ \w+ background with ", caption) else 0


def in_template(scene: Scene, template: int, seed: str) -> str:
    """A descriptive caption of `scene` in one template, the first a seeded search finds."""
    for attempt in range(1000):
        caption = describe(scene, random.Random(f"{seed}/{attempt}"))
        if template_of(caption) == template:
            return caption
    raise RuntimeError(f"no caption in template {template} after 1000 draws")


def phrasing(pipe: TextToImagePipeline, prompts: list[dict], captions: Path | None) -> None:
    shares = [""] * len(TEMPLATES)
    if captions is not None:
        from ml.data.recaption import read_sidecar

        texts = [row["dsc"] for row in read_sidecar(captions).values() if row.get("dsc")]
        counts = [sum(template_of(t) == k for t in texts) for k in range(len(TEMPLATES))]
        shares = [f"{c / len(texts):.3f}" for c in counts]
    print("\n| template | share of training captions | colour | position | both |")
    print("|---|---|---|---|---|")
    for k, name in enumerate(TEMPLATES):
        asked = [p | {"descriptive": in_template(p["scene"], k, p["prompt"])} for p in prompts]
        scores, _ = evaluate_prompt_following(
            lambda texts: pipe(texts, 25, 3.0, seed=1), asked, style="descriptive"
        )
        print(f"| {name} | {shares[k]} | {interval_cells(scores)} |")


PARTS = ("probe", "sweep", "phrasing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("assets/diffusion_model"))
    parser.add_argument("--prompts", type=int, default=72)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--captions", type=Path, help="a recaptioned shard's caption sidecar")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(speed_probe.describe(speed_probe.probe()))
    pipe = TextToImagePipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = single_object_prompts(seed=1, n=args.prompts)
    print(f"{args.model}: {pipe.image_size} px, {len(prompts)} single-object prompts")
    if "probe" in args.parts:
        probe(pipe)
    if "sweep" in args.parts:
        sweep(pipe, prompts, [(1.0, 25), (3.0, 25), (5.0, 25), (8.0, 25), (3.0, 10), (3.0, 50)])
    if "phrasing" in args.parts:
        phrasing(pipe, prompts, args.captions)


if __name__ == "__main__":
    main()
