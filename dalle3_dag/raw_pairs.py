"""`raw_pairs`: the image–text pairs everything else learns from."""

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dagster as dg
import mlflow
from pydantic import Field

from dalle3_dag.metadata import captioned_images
from dalle3_dag.partitions import sync_shard_partitions
from dalle3_dag.project import effective_params, resolve
from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource
from dalle3_dag.versioning import check_specs, commit, folder_check, staged, tracked_run
from ml.data.raw_pairs import RawPairsConfig, RawPairsSummary, build_raw_pairs, source_fingerprint

KEY = "raw_pairs"
SOURCE = "raw_pairs_source"
SUMMARY = "summary.json"
MAX_DECODE_FAILURE_RATE = 0.05


class NoiseParams(dg.Config):
    """Alt-text noise rates: the share of captions that are terse, wrong, irrelevant or empty."""

    terse: float | None = None
    wrong: float | None = None
    irrelevant: float | None = None
    empty: float | None = None


class WorldParams(dg.Config):
    image_size: int | None = None
    min_objects: int | None = None
    max_objects: int | None = None
    word_prob: float | None = None
    texture_prob: float | None = None
    noise: NoiseParams | None = None


class LabelledParams(dg.Config):
    """Where a webdataset source's short and descriptive captions come from."""

    short_field: str | None = None
    descriptive_field: str | None = None
    sidecar: str | None = None


class RawPairsParams(dg.Config):
    """Overrides of the `raw_pairs` section of params.yaml; unset fields keep its values."""

    source: str | None = Field(default=None, description="shapeworld | webdataset")
    uri: str | None = Field(default=None, description="webdataset shards: a folder or s3://bucket/prefix")
    seed: int | None = None
    shard_size: int | None = None
    splits: dict[str, int] | None = Field(default=None, description="samples per ShapeWorld split")
    fractions: dict[str, float] | None = Field(
        default=None, description="webdataset: train/clip/eval shares by key hash"
    )
    labelled: LabelledParams | None = None
    prompts_per_category: int | None = None
    world: WorldParams | None = None


@dg.observable_source_asset(
    key=SOURCE,
    group_name="data",
    required_resource_keys={"storage"},
    description=(
        "What raw_pairs reads: the ShapeWorld generator, or the configured webdataset folder or "
        "s3:// prefix. Its data version is a hash of the shard listing (names, sizes, mtimes "
        "or ETags), so new or rewritten shards mark raw_pairs stale."
    ),
)
def raw_pairs_source(context: dg.OpExecutionContext) -> dg.DataVersion:
    cfg = resolve(RawPairsConfig, KEY)
    return dg.DataVersion(source_fingerprint(cfg, _s3(context.resources.storage, cfg)))


# `dalle3 run` (and the UI's "Observe sources") run this before materializing raw_pairs.
observe_sources = dg.define_asset_job(
    "observe_sources",
    selection=dg.AssetSelection.assets(SOURCE),
    executor_def=dg.in_process_executor,
)


def _s3(storage: StorageResource, cfg: RawPairsConfig) -> Any:
    return storage.s3_client() if cfg.uri.startswith("s3://") else None


@folder_check("Every split holds samples.", blocking=True)
def raw_pairs_sample_count(folder: Path) -> dg.AssetCheckResult:
    counts = {k: s.samples for k, s in RawPairsSummary.load(folder / SUMMARY).splits.items()}
    empty = [k for k, n in counts.items() if n == 0]
    return dg.AssetCheckResult(passed=not empty, metadata={"counts": counts, "empty_splits": empty})


@folder_check(
    f"Skipped (corrupt or malformed) samples stay under {MAX_DECODE_FAILURE_RATE:.0%}.",
    blocking=True,
)
def raw_pairs_decode_failures(folder: Path) -> dg.AssetCheckResult:
    summary = RawPairsSummary.load(folder / SUMMARY)
    kept = sum(s.samples for s in summary.splits.values())
    skipped = sum(n for k, n in summary.skipped.items() if k.startswith("skipped"))
    rate = skipped / max(1, kept + skipped)
    return dg.AssetCheckResult(
        passed=rate <= MAX_DECODE_FAILURE_RATE,
        metadata={"skipped": skipped, "kept": kept, "failure_rate": round(rate, 4)},
    )


@folder_check("Alt-text looks like web captions: mostly non-empty and short.")
def raw_pairs_caption_lengths(folder: Path) -> dg.AssetCheckResult:
    words = RawPairsSummary.load(folder / SUMMARY).splits["train"].caption_words
    passed = words["count"] > 0 and words["empty_frac"] <= 0.5 and 1 <= words["mean"] <= 60
    return dg.AssetCheckResult(passed=passed, metadata=words)


CHECKS = [raw_pairs_sample_count, raw_pairs_decode_failures, raw_pairs_caption_lengths]


@dg.asset(
    key=KEY,
    deps=[SOURCE],
    group_name="data",
    kinds={"python", "mlflow", "dvc"},
    code_version="2",
    check_specs=check_specs(KEY, CHECKS),
    description=(
        "Image–text pairs as webdataset shards (img2dataset layout): the ShapeWorld generator "
        "with web-style noisy alt-text, or existing shards from a folder or s3:// prefix."
    ),
)
def raw_pairs(
    context: dg.AssetExecutionContext,
    config: RawPairsParams,
    storage: StorageResource,
    mlflow_tracker: MlflowResource,
    dvc: DvcResource,
) -> dg.MaterializeResult:
    cfg = resolve(RawPairsConfig, KEY, config)
    s3 = _s3(storage, cfg)
    # Listing the source first reports a missing folder or bad credentials before any work.
    fingerprint = source_fingerprint(cfg, s3)
    with tracked_run(context, mlflow_tracker, dvc):
        mlflow_tracker.log_config(cfg)
        start = time.perf_counter()
        with staged(context, KEY, storage, cfg, CHECKS) as stage:
            summary, preview = build_raw_pairs(cfg, stage.path, s3=s3)
        seconds = time.perf_counter() - start
        sync_shard_partitions(context.instance, summary.splits["train"].shards)
        splits = summary.splits
        total = sum(s.samples for s in splits.values())
        mlflow.log_metrics({"samples": total, "samples_per_s": total / seconds})
        mlflow.log_dict(asdict(summary), "summary.json")
        if preview:
            mlflow.log_artifact(str(storage.asset_dir(KEY) / "preview.png"))
        metadata = {
            "samples": dg.MetadataValue.int(total),
            "samples_per_split": dg.MetadataValue.json({k: s.samples for k, s in splits.items()}),
            "shards": dg.MetadataValue.json({k: s.shards for k, s in splits.items()}),
            "skipped": dg.MetadataValue.json(summary.skipped),
            "caption_words": dg.MetadataValue.json(splits["train"].caption_words),
            "samples_per_s": dg.MetadataValue.float(round(total / seconds, 1)),
            "source_version": fingerprint,
            "preview": captioned_images([(s.image, s.text) for s in preview]),
        }
        params = {KEY: effective_params(KEY, config)}
        return commit(KEY, storage, dvc, metadata, params, stage.checks)
