"""`ablation_model`: the caption ablations' text-to-image models, one per partition
(`<variant>-seed<seed>`, `ml.eval.ablation`), each scored at evenly spaced steps.

A partition trains `diffusion_model`'s model with its loop on its variant's blend of the
recaptioned dataset (the `mixed_training_set` manifest code), keeps the EMA pipeline at each
eval step and scores it. It is written to `<out>/<partition>/` whole or not at all: `run.json`
(the variant's blend and model), `manifest.json`, `scores.json` (per-pair CLIP-S and per-image
verdicts by step, for pooling seeds) and `step-<N>/` pipelines. A killed run resumes from its
checkpoints and keeps the step pipelines it had saved.

    python -m ml.stages.ablation_model --config c.yaml --out DIR --partition dsc95-seed0
"""

import shutil
from pathlib import Path
from typing import Any

from ml.config import to_dict
from ml.eval.ablation import (
    AblationConfig,
    EvalSet,
    VariantRun,
    eval_set,
    eval_steps,
    partition_keys,
    score_checkpoint,
    summary,
    variant_run,
)
from ml.files import replace_folder, write_json
from ml.stage import Inputs, Log, Stage, StageResult, main

RUN = "run.json"
SCORES = "scores.json"
INPUTS = ("raw_pairs", "recaptioned_dataset", "image_autoencoder", "clip_encoder")


def step_folder(step: int) -> str:
    return f"step-{step:06d}"


def run(cfg: AblationConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    from ml.clip import load_clip

    keys = inputs.partitions or partition_keys(cfg)
    runs = {key: variant_run(cfg, key) for key in keys}  # an unknown key fails before any work
    for name in INPUTS:
        inputs[name]
    evals = eval_set(inputs["raw_pairs"], cfg.eval)
    clip = load_clip(inputs["clip_encoder"])
    rows: list[dict[str, Any]] = []
    for key in keys:
        for step, figures in train_partition(cfg, key, runs[key], inputs, out, log, clip, evals):
            rows.append({"partition": key, "step": step} | figures)
    last = {row["partition"]: row for row in rows}  # each partition's final checkpoint
    metrics = {f"{key}/{k}": v for key, row in last.items() for k, v in row.items()
               if isinstance(v, float)}  # fmt: skip
    return StageResult(
        metrics=metrics,
        metadata={"partitions": keys, "eval_steps": eval_steps(cfg)},
        tables={"scores": rows},
    )


def train_partition(
    cfg: AblationConfig,
    key: str,
    variant: VariantRun,
    inputs: Inputs,
    out: Path,
    log: Log,
    clip: Any,
    evals: EvalSet,
) -> list[tuple[int, dict[str, float]]]:
    """Train and score one partition into `<out>/<key>/`; its figures at each eval step."""
    from ml.data.mixed_dataset import MixedDataset
    from ml.diffusion.pipeline import TextToImagePipeline
    from ml.stages.diffusion_model import device, train_model
    from ml.stages.mixed_training_set import blend_manifest

    # Staged beside the checkpoints, whose step pipelines a resumed run still has; without a
    # checkpoint folder, in a scratch folder of the output's.
    work = inputs.checkpoints(variant)
    scratch = work or out / f".{key}.tmp"
    staged, kept = scratch / "staged", scratch / "kept"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    write_json(staged / RUN, to_dict(variant))
    raw, recaptioned = inputs["raw_pairs"], inputs["recaptioned_dataset"]
    manifest = blend_manifest(variant.blend, raw, recaptioned, staged, home=out / key)
    steps = eval_steps(cfg)
    log.info(f"ablation_model {key}: {variant.model.train.steps} steps, scored at {steps}")
    train_model(
        variant.model,
        MixedDataset(manifest),
        log,
        work,
        inputs.resume,
        inputs["image_autoencoder"],
        keep={step: kept / step_folder(step) for step in steps},
    )
    scores: dict[str, Any] = {}
    figures = []
    for step in steps:
        folder = staged / step_folder(step)
        shutil.copytree(kept / step_folder(step), folder)
        pipe = TextToImagePipeline.from_pretrained(folder).to(device())
        pipe.set_progress_bar_config(disable=True)
        scores[str(step)] = score_checkpoint(pipe, clip, evals, cfg.eval)
        figures.append((step, summary(scores[str(step)])))
        log.metrics(step, steps[-1], {f"eval_{k}": v for k, v in figures[-1][1].items()})
    write_json(staged / SCORES, scores)
    replace_folder(staged, out / key)
    if work is None:
        shutil.rmtree(scratch)
    return figures


STAGE = Stage("ablation_model", AblationConfig, INPUTS, run, trains=True)

if __name__ == "__main__":
    main([STAGE])
