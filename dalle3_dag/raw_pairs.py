"""`raw_pairs`: the image–text pairs everything else learns from."""

import time
from dataclasses import asdict

import dagster as dg
import mlflow
from pydantic import Field

from dalle3_dag.metadata import captioned_images
from dalle3_dag.partitions import sync_shard_partitions
from dalle3_dag.project import resolve
from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource
from dalle3_dag.versioning import commit, tracked_run
from ml.data.raw_pairs import RawPairsConfig, RawPairsSummary, build_raw_pairs

KEY = "raw_pairs"
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


class RawPairsParams(dg.Config):
    """Overrides of the `raw_pairs` section of params.yaml; unset fields keep its values."""

    source: str | None = Field(default=None, description="shapeworld | webdataset")
    uri: str | None = Field(default=None, description="webdataset shards: a folder or s3://bucket/prefix")
    seed: int | None = None
    shard_size: int | None = None
    splits: dict[str, int] | None = Field(default=None, description="samples per ShapeWorld split")
    prompts_per_category: int | None = None
    world: WorldParams | None = None


@dg.asset(
    key=KEY,
    group_name="data",
    kinds={"python", "mlflow", "dvc"},
    code_version="1",
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
    s3 = storage.s3_client() if cfg.uri.startswith("s3://") else None
    with tracked_run(context, mlflow_tracker, dvc):
        mlflow_tracker.log_config(cfg)
        start = time.perf_counter()
        with storage.writing(KEY) as out:
            summary, preview = build_raw_pairs(cfg, out, s3=s3)
        seconds = time.perf_counter() - start
        sync_shard_partitions(context.instance, summary.splits["train"].shards)
        splits = summary.splits
        total = sum(s.samples for s in splits.values())
        mlflow.log_metrics({"samples": total, "samples_per_s": total / seconds})
        mlflow.log_dict(asdict(summary), "summary.json")
        if preview:
            mlflow.log_artifact(str(storage.asset_dir(KEY) / "preview.png"))
        return commit(KEY, storage, dvc, {
            "samples": dg.MetadataValue.int(total),
            "samples_per_split": dg.MetadataValue.json({k: s.samples for k, s in splits.items()}),
            "shards": dg.MetadataValue.json({k: s.shards for k, s in splits.items()}),
            "skipped": dg.MetadataValue.json({k: s.skipped for k, s in splits.items()}),
            "caption_words": dg.MetadataValue.json(splits["train"].caption_words),
            "samples_per_s": dg.MetadataValue.float(round(total / seconds, 1)),
            "preview": captioned_images([(s.image, s.text) for s in preview]),
        })


def _summary(storage: StorageResource) -> RawPairsSummary:
    return RawPairsSummary.load(storage.asset_dir(KEY) / "summary.json")


@dg.asset_check(asset=KEY, blocking=True, description="Every split holds samples.")
def raw_pairs_sample_count(storage: StorageResource) -> dg.AssetCheckResult:
    counts = {k: s.samples for k, s in _summary(storage).splits.items()}
    empty = [k for k, n in counts.items() if n == 0]
    return dg.AssetCheckResult(passed=not empty, metadata={"counts": counts, "empty_splits": empty})


@dg.asset_check(
    asset=KEY,
    blocking=True,
    description=f"Skipped (corrupt or malformed) samples stay under {MAX_DECODE_FAILURE_RATE:.0%}.",
)
def raw_pairs_decode_failures(storage: StorageResource) -> dg.AssetCheckResult:
    splits = _summary(storage).splits.values()
    kept = sum(s.samples for s in splits)
    skipped = sum(n for s in splits for k, n in s.skipped.items() if k.startswith("skipped"))
    rate = skipped / max(1, kept + skipped)
    return dg.AssetCheckResult(
        passed=rate <= MAX_DECODE_FAILURE_RATE,
        metadata={"skipped": skipped, "kept": kept, "failure_rate": round(rate, 4)},
    )


@dg.asset_check(
    asset=KEY, description="Alt-text looks like web captions: mostly non-empty and short."
)
def raw_pairs_caption_lengths(storage: StorageResource) -> dg.AssetCheckResult:
    words = _summary(storage).splits["train"].caption_words
    passed = words["count"] > 0 and words["empty_frac"] <= 0.5 and 1 <= words["mean"] <= 60
    return dg.AssetCheckResult(passed=passed, metadata=words)
