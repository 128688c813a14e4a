"""The text-to-image stages: `diffusion_model` (T5 + U-Net) and `distilled_model` (2-step).

Both score prompt following the same way (`ml.eval.oracle`): single-object prompts, the
generated object's colour and position against the prompt's.
"""

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import mlflow
import torch
from PIL import Image

from dalle3_dag.config import floors
from dalle3_dag.project import TRAINING_TAGS, effective_params, resolve
from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource
from dalle3_dag.versioning import (
    check_specs,
    commit,
    folder_check,
    log_step,
    read_metrics,
    staged,
    tracked_run,
    write_metrics,
)
from ml.diffusion.config import DiffusionConfig
from ml.diffusion.distill import DistillConfig, distill
from ml.diffusion.pipeline import TextToImagePipeline
from ml.diffusion.train import CADENCE_FIELDS, PIPELINE, train_diffusion
from ml.eval.oracle import (
    PromptFollowingConfig,
    evaluate_prompt_following,
    single_object_prompts,
)
from ml.viz import image_grid

MIX, DIFFUSION, DISTILLED = "mixed_training_set", "diffusion_model", "distilled_model"
EVAL = "prompt_following"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The fixed prompts whose samples the MLflow runs show as training goes on.
SAMPLE_PROMPTS = [
    "a red circle in the top left",
    "a blue square in the center",
    "a green triangle in the bottom right",
    "a yellow star on the left",
    "a white cross at the top",
    "a purple diamond on the right",
    "an orange circle at the bottom",
    "a black square in the top right corner",
]


class DiffusionParams(dg.Config):
    """Overrides of params.yaml's `diffusion_model` section, and how to treat checkpoints."""

    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    resume: bool = True  # continue from the newest checkpoint of the same config and data


class DistillParams(dg.Config):
    """Overrides of params.yaml's `distilled_model` section."""

    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None


def checkpoint_dir(storage: StorageResource, cfg: DiffusionConfig, data_version: str) -> Path:
    """Where a training run keeps its checkpoints: outside the asset folder (DVC versions the
    model, not its checkpoints), one folder per (config, data), so a changed config or
    dataset starts over while a rerun of a killed materialization resumes."""
    identity = {k: v for k, v in cfg.to_dict().items() if k not in CADENCE_FIELDS}
    identity["data"] = data_version
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(storage.root) / ".checkpoints" / DIFFUSION / digest


def score(
    pipe: TextToImagePipeline, cfg: PromptFollowingConfig, steps: int
) -> tuple[dict[str, float], Image.Image]:
    """Prompt-following scores of a pipeline and the grid of its images.

    Asked in the descriptive style of its training captions (the paper's upsampled prompts);
    the same prompts written short are scored too, as `short_*`, to show what upsampling buys.
    """
    pipe.set_progress_bar_config(disable=True)
    prompts = single_object_prompts(cfg.seed, cfg.prompts)

    def generate(texts: list[str]) -> list[Image.Image]:
        return pipe(
            texts, num_inference_steps=steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed
        )

    scores, images = evaluate_prompt_following(generate, prompts, style="descriptive")
    short, _ = evaluate_prompt_following(generate, prompts, style="prompt")
    for name in ("color_accuracy", "position_accuracy", "both_accuracy"):
        scores[f"short_{name}"] = short[name]
    return scores, image_grid(images, cols=9, scale=4)


def log_images(step: int, record: dict) -> None:
    """Metrics to MLflow at their step; sample grids as step-numbered images."""
    metrics = {k: v for k, v in record.items() if isinstance(v, int | float)}
    if metrics:
        log_step(step, metrics)
    for name, value in record.items():
        if isinstance(value, Image.Image):
            mlflow.log_image(value, f"{name}/step-{step:06d}.png")


def score_saved(
    out: Path, cfg: PromptFollowingConfig, steps: int, extra: dict[str, float] | None = None
) -> tuple[dict[str, float], Image.Image]:
    """Score the pipeline saved in `out`, loaded the way users load it, and keep the scores
    (with `extra`) and the grid beside it, where the asset checks read them."""
    scores, grid = score(TextToImagePipeline.from_pretrained(out).to(DEVICE), cfg, steps)
    scores |= extra or {}
    grid.save(out / "prompt_following.png")
    write_metrics(out, scores)
    return scores, grid


@folder_check(
    "Single-object prompts: the generated object's colour and position match the prompt at "
    "least `checks.prompt_following_over_chance` times as often as chance."
)
def diffusion_model_follows_prompts(folder: Path) -> dg.AssetCheckResult:
    metrics, ratio = read_metrics(folder), floors().prompt_following_over_chance
    passed = all(
        metrics[f"{what}_accuracy"] >= ratio * metrics[f"{what}_chance"]
        for what in ("color", "position")
    )
    return dg.AssetCheckResult(passed=passed, metadata={**metrics, "floor_over_chance": ratio})


@folder_check(
    "The 2-step student's colour and position accuracy are each within "
    "`checks.student_max_gap` of the teacher's."
)
def distilled_model_keeps_up(folder: Path) -> dg.AssetCheckResult:
    metrics, gap = read_metrics(folder), floors().student_max_gap
    passed = all(
        metrics[f"teacher_{name}"] - metrics[name] <= gap
        for name in ("color_accuracy", "position_accuracy")
    )
    return dg.AssetCheckResult(passed=passed, metadata={**metrics, "max_gap": gap})


TEACHER_CHECKS, STUDENT_CHECKS = [diffusion_model_follows_prompts], [distilled_model_keeps_up]


@dg.asset(
    key=DIFFUSION,
    deps=[MIX],
    group_name="text_to_image",
    kinds={"pytorch", "diffusers", "mlflow", "dvc"},
    op_tags=TRAINING_TAGS,
    code_version="2",
    check_specs=check_specs(DIFFUSION, TEACHER_CHECKS),
    description=(
        "The T5-conditioned U-Net diffusion model trained on the blended training set "
        "(accelerate loop, CFG caption dropout, EMA, resumable checkpoints), saved in diffusers "
        "layout with its EMA weights; scored on single-object prompt following."
    ),
)
def diffusion_model(
    context: dg.AssetExecutionContext,
    config: DiffusionParams,
    storage: StorageResource,
    mlflow_tracker: MlflowResource,
    dvc: DvcResource,
) -> dg.MaterializeResult:
    # `resume` says how to run, not what to train: it is not part of the model's config.
    run_config = config.model_copy(update={"resume": None})
    cfg = resolve(DiffusionConfig, DIFFUSION, run_config)
    evaluation = resolve(PromptFollowingConfig, EVAL)
    manifest = storage.asset_dir(MIX) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no training set manifest at {manifest}: materialize {MIX}")
    work = checkpoint_dir(storage, cfg, dvc.out_hash(MIX) or "unversioned")
    with tracked_run(context, mlflow_tracker, dvc):
        mlflow_tracker.log_config(cfg)
        mlflow.log_param("checkpoint_dir", str(work))
        stats = train_diffusion(
            cfg, manifest, work, log_images, "latest" if config.resume else None, SAMPLE_PROMPTS
        )
        if stats["resumed_from"] is not None:
            context.log.info(f"resumed from the checkpoint at step {stats['resumed_from']}")
        effective = {DIFFUSION: cfg.to_dict(), EVAL: asdict(evaluation)}
        with staged(context, DIFFUSION, storage, effective, TEACHER_CHECKS) as stage:
            shutil.copytree(work / PIPELINE, stage.path, dirs_exist_ok=True)
            scores, grid = score_saved(stage.path, evaluation, evaluation.teacher_steps)
        mlflow.log_metrics({**scores, "train_images_per_s": stats["images_per_s"]})
        mlflow.log_image(grid, "prompt_following.png")
        version = mlflow_tracker.register(DIFFUSION, storage.asset_dir(DIFFUSION))
        metadata = {
            "steps": dg.MetadataValue.int(stats["steps"]),
            "resumed_from_step": stats["resumed_from"],
            "train_seconds": dg.MetadataValue.float(round(stats["seconds"], 1)),
            "train_images_per_s": dg.MetadataValue.float(round(stats["images_per_s"], 1)),
            "unet_parameters": dg.MetadataValue.int(stats["unet_parameters"]),
            "text_encoder_parameters": dg.MetadataValue.int(stats["text_encoder_parameters"]),
            "registered_version": version,
            **{k: dg.MetadataValue.float(round(v, 4)) for k, v in scores.items()},
        }
        params = {DIFFUSION: effective_params(DIFFUSION, run_config), EVAL: effective_params(EVAL)}
        return commit(DIFFUSION, storage, dvc, metadata, params, stage.checks)


@dg.asset(
    key=DISTILLED,
    deps=[DIFFUSION, MIX],
    group_name="text_to_image",
    kinds={"pytorch", "diffusers", "mlflow", "dvc"},
    op_tags=TRAINING_TAGS,
    code_version="2",
    check_specs=check_specs(DISTILLED, STUDENT_CHECKS),
    description=(
        "The diffusion model consistency-distilled (LCM) into a student that samples in 2 "
        "steps with guidance built in; same layout and pipeline class as the teacher."
    ),
)
def distilled_model(
    context: dg.AssetExecutionContext,
    config: DistillParams,
    storage: StorageResource,
    mlflow_tracker: MlflowResource,
    dvc: DvcResource,
) -> dg.MaterializeResult:
    cfg = resolve(DistillConfig, DISTILLED, config)
    evaluation = resolve(PromptFollowingConfig, EVAL)
    teacher_dir = storage.asset_dir(DIFFUSION)
    if not (teacher_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"no diffusion model at {teacher_dir}: materialize {DIFFUSION}")
    with tracked_run(context, mlflow_tracker, dvc):
        mlflow_tracker.log_config(cfg)
        teacher = TextToImagePipeline.from_pretrained(teacher_dir).to(DEVICE)
        effective = {DISTILLED: asdict(cfg), EVAL: asdict(evaluation)}
        with staged(context, DISTILLED, storage, effective, STUDENT_CHECKS) as stage:
            manifest = storage.asset_dir(MIX) / "manifest.json"
            stats = distill(teacher, cfg, manifest, stage.path, log_images)
            taught = read_metrics(teacher_dir)
            compared = {f"teacher_{k}": taught[k] for k in ("color_accuracy", "position_accuracy")}
            scores, grid = score_saved(stage.path, evaluation, evaluation.student_steps, compared)
        mlflow.log_metrics({**scores, "distill_images_per_s": stats["images_per_s"]})
        # Teacher above student: the same prompts and seeds.
        teacher_grid = Image.open(teacher_dir / "prompt_following.png")
        mlflow.log_image(image_grid([teacher_grid, grid], cols=1, pad=0), "teacher_vs_student.png")
        version = mlflow_tracker.register(DISTILLED, storage.asset_dir(DISTILLED))
        metadata = {
            "steps": dg.MetadataValue.int(stats["steps"]),
            "distill_seconds": dg.MetadataValue.float(round(stats["seconds"], 1)),
            "sampling_steps": dg.MetadataValue.int(evaluation.student_steps),
            "registered_version": version,
            **{k: dg.MetadataValue.float(round(v, 4)) for k, v in scores.items()},
        }
        params = {DISTILLED: effective_params(DISTILLED, config), EVAL: effective_params(EVAL)}
        return commit(DISTILLED, storage, dvc, metadata, params, stage.checks)
