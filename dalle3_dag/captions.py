"""The caption stages: `clip_encoder`, the captioners, `recaptioned_dataset`, `mixed_training_set`.

Each asset reads its params.yaml section (run config overrides single fields), calls `ml`,
logs to MLflow and versions its folder with DVC.
"""

from dataclasses import asdict
from pathlib import Path

import dagster as dg
import mlflow

from dalle3_dag.config import CHECKS, TrainParams, floors, not_measured
from dalle3_dag.metadata import captioned_images
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
from ml.captioner.model import Captioner
from ml.captioner.stages import (
    STAGES,
    CaptionerStageConfig,
    ImageCaptioner,
    evaluate,
    stage_captions,
    train_stage,
)
from ml.clip import (
    ClipConfig,
    load_clip,
    pairwise_preference,
    retrieval_recall,
    save_clip,
    train_toy_clip,
)
from ml.data.raw_pairs import load_split
from ml.data.shapeworld import scene_of
from ml.viz import image_grid

RAW = "raw_pairs"
CLIP = "clip_encoder"


class ClipParams(dg.Config):
    """Overrides of params.yaml's `clip_encoder` section."""

    source: str | None = None  # toy | pretrained
    model_name: str | None = None  # pretrained: an open_clip architecture, e.g. ViT-B-32
    checkpoint: str | None = None  # pretrained: a local weights file (never downloaded)
    train: TrainParams | None = None


@folder_check(
    "The CLIP ranks an image's own descriptive caption above that of the same scene with one "
    "object recoloured, for at least `checks.clip_color_preference` of held-out images, and "
    "retrieves captions at least `checks.clip_recall_over_chance` times as often as chance. "
    "Blocking: every later stage reads images through this CLIP.",
    blocking=True,
)
def clip_encoder_binds_attributes(folder: Path) -> dg.AssetCheckResult:
    metrics = read_metrics(folder)
    if "color_preference" not in metrics:
        return not_measured("raw_pairs/eval has no scene graphs to recolour", metrics)
    floor = floors()
    passed = (
        metrics["color_preference"] >= floor.clip_color_preference
        and metrics["recall_at_5"] >= floor.clip_recall_over_chance * metrics["chance_at_5"]
    )
    return dg.AssetCheckResult(passed=passed, metadata={**metrics, **asdict(floor)})


@dg.asset(
    key=CLIP,
    deps=[RAW],
    group_name="captioner",
    kinds={"pytorch", "mlflow", "dvc"},
    op_tags=TRAINING_TAGS,
    code_version="2",
    check_specs=check_specs(CLIP, [clip_encoder_binds_attributes]),
    description=(
        "The CLIP behind the captioner's F(i) and CLIP-S, in open_clip's local-dir layout: a "
        "pretrained open_clip checkpoint from a local path, or (toy) a small CLIP trained "
        "contrastively on the held-out `clip` split's descriptive captions."
    ),
)
def clip_encoder(
    context: dg.AssetExecutionContext,
    config: ClipParams,
    storage: StorageResource,
    mlflow_tracker: MlflowResource,
    dvc: DvcResource,
) -> dg.MaterializeResult:
    cfg = resolve(ClipConfig, CLIP, config)
    raw = storage.asset_dir(RAW)
    with tracked_run(context, mlflow_tracker, dvc):
        mlflow_tracker.log_config(cfg)
        with staged(context, CLIP, storage, cfg, [clip_encoder_binds_attributes]) as stage:
            if cfg.source == "toy":
                model = train_toy_clip(load_split(raw, "clip"), cfg, log=log_step)
            else:
                model, _, _ = load_clip(cfg)
            save_clip(model, cfg, stage.path)
            # Evaluate what was saved, loaded the way users load it.
            model, preprocess, tokenizer = load_clip(stage.path)
            held_out = load_split(raw, "eval")
            recall = retrieval_recall(model, preprocess, tokenizer, held_out)
            # MLflow metric names take no '@'
            metrics = {name.replace("@", "_at_"): value for name, value in recall.items()}
            if all(scene_of(s) for s in held_out):  # attribute binding needs scene graphs
                for attribute in ("color", "shape"):
                    metrics[f"{attribute}_preference"] = pairwise_preference(
                        model, preprocess, tokenizer, held_out, attribute
                    )
            write_metrics(stage.path, metrics)
        mlflow.log_metrics(metrics)
        metadata = {
            "source": cfg.source,
            "held_out_samples": dg.MetadataValue.int(len(held_out)),
            **{name: dg.MetadataValue.float(round(value, 4)) for name, value in metrics.items()},
        }
        # The blocking check's floors decide what goes live, so they are the stage's params too.
        params = {CLIP: effective_params(CLIP, config), CHECKS: effective_params(CHECKS)}
        return commit(CLIP, storage, dvc, metadata, params, stage.checks)


class CaptionerModelParams(dg.Config):
    token_stride: int | None = None
    prefix_length: int | None = None
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None


class CaptionerParams(dg.Config):
    """Overrides of a captioner stage's params.yaml section."""

    train: TrainParams | None = None
    model: CaptionerModelParams | None = None
    max_new_tokens: int | None = None
    patch_tokens: bool | None = None


CAPTIONER_DESCRIPTIONS = {
    "base": "Captioner pretrained on the raw pairs' alt-text: a GPT-2-style LM prefixed with "
    "the frozen CLIP's image features (ClipCap-style prefix, DALL·E 3 §2.1).",
    "ssc": "Captioner fine-tuned from base on short synthetic captions (the main subject only).",
    "dsc": "Captioner fine-tuned from base on descriptive synthetic captions: every object with "
    "colour, size and position, the background and any rendered text.",
}
TRAIN_SPLIT = {"base": "train", "ssc": "labelled", "dsc": "labelled"}
PREVIEW = 12


@folder_check(
    "Descriptive captions state ShapeWorld's ground-truth attributes: recall and precision "
    "on held-out images at least `checks.dsc_attribute_recall` / `dsc_attribute_precision`."
)
def captioner_dsc_attributes(folder: Path) -> dg.AssetCheckResult:
    metrics = read_metrics(folder)
    if "attribute_recall" not in metrics:
        return not_measured("raw_pairs/eval has no scene graphs to score against", metrics)
    floor = floors()
    passed = (
        metrics["attribute_recall"] >= floor.dsc_attribute_recall
        and metrics["attribute_precision"] >= floor.dsc_attribute_precision
    )
    return dg.AssetCheckResult(passed=passed, metadata=metrics)


@folder_check(
    "Short captions name the main object correctly for at least "
    "`checks.ssc_main_object_accuracy` of held-out images."
)
def captioner_ssc_main_object(folder: Path) -> dg.AssetCheckResult:
    metrics = read_metrics(folder)
    if "main_object_accuracy" not in metrics:
        return not_measured("raw_pairs/eval has no scene graphs to score against", metrics)
    floor = floors().ssc_main_object_accuracy
    passed = metrics["main_object_accuracy"] >= floor
    return dg.AssetCheckResult(passed=passed, metadata={**metrics, "floor": floor})


CAPTIONER_CHECKS = {
    "base": [],
    "ssc": [captioner_ssc_main_object],
    "dsc": [captioner_dsc_attributes],
}


def captioner_asset(stage: str) -> dg.AssetsDefinition:
    """One of the three captioner assets; they differ only in data and starting point."""
    key = f"captioner_{stage}"
    deps = [RAW, CLIP] if stage == "base" else [RAW, CLIP, "captioner_base"]

    checks = CAPTIONER_CHECKS[stage]

    @dg.asset(
        name=key,
        deps=deps,
        group_name="captioner",
        kinds={"pytorch", "transformers", "mlflow", "dvc"},
        op_tags=TRAINING_TAGS,
        code_version="2",
        check_specs=check_specs(key, checks),
        description=CAPTIONER_DESCRIPTIONS[stage],
    )
    def _captioner(
        context: dg.AssetExecutionContext,
        config: CaptionerParams,
        storage: StorageResource,
        mlflow_tracker: MlflowResource,
        dvc: DvcResource,
    ) -> dg.MaterializeResult:
        cfg = resolve(CaptionerStageConfig, key, config)
        raw, clip_dir = storage.asset_dir(RAW), storage.asset_dir(CLIP)
        samples = load_split(raw, TRAIN_SPLIT[stage])
        base, corpus = None, []
        if stage == "base":
            if (raw / "labelled").is_dir():  # let the vocabulary cover the fine-tuning captions
                labelled = load_split(raw, "labelled")
                corpus = stage_captions("ssc", labelled) + stage_captions("dsc", labelled)
        else:
            base = Captioner.from_pretrained(storage.asset_dir("captioner_base"))
        with tracked_run(context, mlflow_tracker, dvc):
            mlflow_tracker.log_config(cfg)
            mlflow.log_param("train_samples", len(samples))
            with staged(context, key, storage, cfg, checks) as stage_dir:
                out = stage_dir.path
                model = train_stage(stage, cfg, clip_dir, samples, base, corpus, log_step)
                model.save_pretrained(out)
                held_out = load_split(raw, "eval")
                captions = ImageCaptioner(clip_dir, out, cfg.max_new_tokens)(
                    [s.image for s in held_out]
                )
                metrics = evaluate(captions, held_out)
                write_metrics(out, metrics)
                mlflow.log_metrics(metrics)
            examples = [(s.image, c) for s, c in zip(held_out[:PREVIEW], captions, strict=False)]
            mlflow.log_image(image_grid([im for im, _ in examples], scale=4), "samples.png")
            mlflow.log_dict(
                {s.key: c for s, c in zip(held_out, captions, strict=True)}, "eval_captions.json"
            )
            version = mlflow_tracker.register(key, storage.asset_dir(key))
            metadata = {
                "train_samples": dg.MetadataValue.int(len(samples)),
                "registered_version": version,
                **{name: dg.MetadataValue.float(round(v, 4)) for name, v in metrics.items()},
                "eval_captions": captioned_images(examples),
            }
            params = {key: effective_params(key, config)}
            return commit(key, storage, dvc, metadata, params, stage_dir.checks)

    return _captioner


captioner_base, captioner_ssc, captioner_dsc = (captioner_asset(s) for s in STAGES)
