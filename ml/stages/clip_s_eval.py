"""`clip_s_eval`: the paper's evaluation of the teacher and its 2-step student.

For each model, with fixed seeds:
- CLIP-S in the paper's two settings (DALL·E 3 section 4.1): images generated from the held-out
  eval split's alt-text scored against it, and from its descriptive captions against those;
  the paper's variant and Hessel's (`ml.eval.clip_score`);
- GenEval-style prompt following on raw_pairs' held-out prompts (`prompts.json`), per category
  with 95% intervals (`ml.eval.oracle`), asked as written (`short`), as the target scene's
  descriptive caption (`descriptive`: upsampled by the ground truth, see `ml.eval.oracle`) and
  as the `prompt_upsampler` rewrites them (`upsampled`: the paper's section 3.5); and on the
  single-object "position" prompts, the object's colour and position (`single_*`), which the
  oracle reads reliably even from blurred images.

    python -m ml.stages.clip_s_eval --config c.yaml --out DIR [--assets assets]
"""

import json
from pathlib import Path
from typing import Any

from ml.eval.config import ClipSEvalConfig
from ml.files import write_json
from ml.stage import Inputs, Log, Stage, StageResult, main

MODELS = {"teacher": "diffusion_model", "student": "distilled_model"}
STYLES = ("descriptive", "short", "upsampled")
SINGLE = ("single_color", "single_position", "single_both")  # of the "position" prompts
SCORES = "scores.json"  # per-image verdicts and per-pair CLIP-S, for a look after the fact


def prompt_texts(prompts: list[dict[str, Any]], seed: int, upsampler: Any) -> dict[str, list[str]]:
    """Each held-out prompt in each style: as written, as its target scene's descriptive
    caption, and as the upsampler rewrites it."""
    from ml.eval.oracle import descriptive_prompt

    written = [p["prompt"] for p in prompts]
    return {
        "descriptive": [descriptive_prompt(p, seed) for p in prompts],
        "short": written,
        "upsampled": upsampler(written, seed=seed) if written else [],
    }


def single_object_scores(
    images: list[Any], prompts: list[dict[str, Any]]
) -> dict[str, float]:
    """Colour, position and both of the "position" prompts' images, with Wilson intervals."""
    from ml.data.shapeworld import Scene
    from ml.eval.oracle import score_prompt_following, wilson

    chosen = [i for i, p in enumerate(prompts) if p["category"] == "position"]
    if not chosen:
        return {}
    scenes = [Scene.from_dict(prompts[i]["scene"]) for i in chosen]
    scores = score_prompt_following([images[i] for i in chosen], scenes)
    out: dict[str, float] = {}
    for what in ("color", "position", "both"):
        accuracy = scores[f"{what}_accuracy"]
        low, high = wilson(round(accuracy * len(chosen)), len(chosen))
        out |= {f"single_{what}_accuracy": accuracy, f"single_{what}_low": low,
                f"single_{what}_high": high, f"single_{what}_n": float(len(chosen))}  # fmt: skip
    return out


def clip_s_captions(raw: Path, n: int) -> dict[str, list[str]]:
    """The paper's two CLIP-S settings: the first `n` eval-split samples' alt-text and their
    descriptive captions. An empty alt-text describes nothing, so it is left out."""
    from ml.data.raw_pairs import load_split

    samples = load_split(raw, "eval")[:n]
    return {
        "alt": [s.text for s in samples if s.text.strip()],
        "descriptive": [
            s.meta["descriptive_caption"] for s in samples if "descriptive_caption" in s.meta
        ],
    }


def run(cfg: ClipSEvalConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    from ml.clip import load_clip
    from ml.data.shapeworld import EVAL_CATEGORIES
    from ml.diffusion.pipeline import TextToImagePipeline
    from ml.eval.clip_score import VARIANTS, clip_score
    from ml.eval.oracle import score_by_category
    from ml.stages.diffusion_model import device
    from ml.upsampler import load_upsampler
    from ml.viz import image_grid

    raw, clip_dir = inputs["raw_pairs"], inputs["clip_encoder"]
    models = {name: inputs[key] for name, key in MODELS.items()}  # missing ones named first
    settings = clip_s_captions(raw, cfg.captions)
    prompts_file = raw / "prompts.json"
    prompts = json.loads(prompts_file.read_text()) if prompts_file.is_file() else []
    clip = load_clip(clip_dir)
    texts_by_style = prompt_texts(prompts, cfg.seed, load_upsampler(inputs["prompt_upsampler"]))
    n_images = sum(len(v) for v in settings.values()) + len(STYLES) * len(prompts) * (
        cfg.images_per_prompt
    )
    log.info(f"clip_s_eval: {n_images} images per model, {len(prompts)} prompts")

    metrics: dict[str, float] = {}
    images: dict[str, Any] = {}
    examples: list[tuple[Any, dict[str, Any]]] = []
    details: dict[str, Any] = {}
    clip_rows: list[dict[str, Any]] = []
    oracle_rows: list[dict[str, Any]] = []
    bars: list[dict[str, Any]] = []  # the DVC plot: one bar per model, style and category
    for name, folder in models.items():
        pipe = TextToImagePipeline.from_pretrained(folder).to(device())
        pipe.set_progress_bar_config(disable=True)
        steps = cfg.teacher_steps if name == "teacher" else cfg.student_steps
        for setting, captions in settings.items():
            if not captions:
                continue
            generated = sample(pipe, captions, steps, cfg)
            row: dict[str, Any] = {"model": name, "captions": setting, "n": len(captions)}
            for variant in VARIANTS:
                score = clip_score(*clip, generated, captions, variant)
                metrics[f"{name}_clip_s_{variant}_{setting}"] = row[variant] = score.score
                details[f"{name}/clip_s_{variant}_{setting}"] = score.per_pair
            clip_rows.append(row)
        for style in STYLES if prompts else ():
            repeated = [p for p in prompts for _ in range(cfg.images_per_prompt)]
            texts = [t for t in texts_by_style[style] for _ in range(cfg.images_per_prompt)]
            generated = sample(pipe, texts, steps, cfg)
            scores = score_by_category(generated, repeated)
            scores |= single_object_scores(generated, repeated)
            metrics |= {f"{name}_{style}_{k}": v for k, v in scores.items()}
            oracle_rows.append({"model": name, "prompts": style} | {
                c: f"{scores[f'{c}_accuracy']:.2f} [{scores[f'{c}_low']:.2f}, "
                   f"{scores[f'{c}_high']:.2f}]"
                for c in (*EVAL_CATEGORIES, *SINGLE) if f"{c}_accuracy" in scores
            } | {"overall": scores["overall_accuracy"]})  # fmt: skip
            bars += [
                {"case": f"{name} {style} {c}"}
                | {k: scores[f"{c}_{k}"] for k in ("accuracy", "low", "high")}
                for c in (*EVAL_CATEGORIES, *SINGLE) if f"{c}_accuracy" in scores
            ]
            if style == "descriptive":
                rows = _first_of_each(repeated, generated, cfg)
                grid = image_grid([im for row in rows for _, im in row], cols=len(rows[0]), scale=4)
                grid.save(out / f"{name}_samples.png")
                images[f"{name}_samples"] = grid
                if name == "teacher":
                    examples = [row[0][::-1] for row in rows]
        log.info(f"clip_s_eval: {name} scored")
    details["upsampled_prompts"] = [
        {"prompt": p, "upsampled": u}
        for p, u in zip(texts_by_style["short"], texts_by_style["upsampled"], strict=True)
    ]
    write_json(out / SCORES, details)
    return StageResult(
        metrics=metrics,
        metadata={
            "prompts": len(prompts),
            "images_per_prompt": cfg.images_per_prompt,
            "captions_scored": {setting: len(c) for setting, c in settings.items()},
        },
        images=images,
        examples=[(image, prompt["prompt"]) for image, prompt in examples],
        tables={"prompt_following": oracle_rows, "clip_s": clip_rows},
        curves={"prompt_following": bars},
    )


def sample(pipe: Any, texts: list[str], steps: int, cfg: ClipSEvalConfig) -> list[Any]:
    """One image per text, in batches; batch k is seeded `seed + k * batch_size`, so the
    images are a function of the config and the texts."""
    return [
        image
        for i in range(0, len(texts), cfg.batch_size)
        for image in pipe(texts[i : i + cfg.batch_size], steps, cfg.guidance_scale, cfg.seed + i)
    ]


def _first_of_each(
    repeated: list[dict[str, Any]], generated: list[Any], cfg: ClipSEvalConfig
) -> list[list[tuple[dict[str, Any], Any]]]:
    """A row per category: (prompt, its first image) for its first `grid_prompts` prompts."""
    rows: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    for i in range(0, len(repeated), cfg.images_per_prompt):
        row = rows.setdefault(repeated[i]["category"], [])
        if len(row) < cfg.grid_prompts:
            row.append((repeated[i], generated[i]))
    return list(rows.values())


STAGE = Stage(
    "clip_s_eval",
    ClipSEvalConfig,
    ("raw_pairs", "clip_encoder", "diffusion_model", "distilled_model", "prompt_upsampler"),
    run,
)

if __name__ == "__main__":
    main([STAGE])
