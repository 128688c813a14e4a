"""The data group: `raw_pairs` (and the source it reads), `recaptioned_dataset`,
`mixed_training_set`."""

import math
from pathlib import Path

import dagster as dg

from dalle3_dag.automation import EAGER
from dalle3_dag.factory import stage_asset
from dalle3_dag.partitions import SHARDS, sync_shard_partitions
from dalle3_dag.project import resolve
from dalle3_dag.versioning import folder_check
from ml.data.mixed import MixManifest, mix_stats
from ml.data.raw_pairs import RawPairsConfig, RawPairsSummary, source_fingerprint
from ml.stage import StageResult
from ml.stages import mixed_training_set as mixed
from ml.stages import raw_pairs as raw
from ml.stages import recaptioned_dataset as recaptioned

SOURCE = "raw_pairs_source"
SUMMARY = "summary.json"
MAX_DECODE_FAILURE_RATE = 0.05


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
    cfg, _ = resolve(RawPairsConfig, raw.STAGE.name)
    s3 = context.resources.storage.s3_client() if cfg.uri.startswith("s3://") else None
    return dg.DataVersion(source_fingerprint(cfg, s3))


# `dalle3 run` (and the UI's "Observe sources") run this before materializing raw_pairs.
observe_sources = dg.define_asset_job(
    "observe_sources",
    selection=dg.AssetSelection.assets(SOURCE),
    executor_def=dg.in_process_executor,
)


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


def _shard_partitions(context: dg.AssetExecutionContext, result: StageResult) -> None:
    """New training shards become partitions of recaptioned_dataset."""
    sync_shard_partitions(context.instance, result.metadata["shards"]["train"])


raw_pairs = stage_asset(
    raw.STAGE,
    module=__name__,
    group="data",
    kinds={"python"},
    deps=[SOURCE],
    checks=[raw_pairs_sample_count, raw_pairs_decode_failures, raw_pairs_caption_lengths],
    after=_shard_partitions,
    description=(
        "Image–text pairs as webdataset shards (img2dataset layout): the ShapeWorld generator "
        "with web-style noisy alt-text, or existing shards from a folder or s3:// prefix."
    ),
)

recaptioned_dataset = stage_asset(
    recaptioned.STAGE,
    module=__name__,
    group="data",
    kinds={"parquet"},
    partitions_def=SHARDS,
    automation=EAGER,
    description=(
        "Per-shard Parquet sidecars keyed by __key__: the alt-text, the SSC and DSC captions "
        "and the captioner versions. Images are never copied. One partition per raw_pairs "
        "shard; a shard whose sidecar is complete for the same captioners is skipped."
    ),
)


@folder_check(
    "The epoch-0 blend takes the synthetic caption at rate p, within sampling noise "
    "(3 standard deviations, at least 1 point); empty captions that forced a fallback count "
    "against it."
)
def mixed_training_set_ratio(folder: Path) -> dg.AssetCheckResult:
    manifest = MixManifest.load(folder / mixed.MANIFEST)
    stats = mix_stats(manifest, epoch=0)
    p, n = manifest.synthetic_ratio, max(1, stats["samples"])
    tolerance = max(0.01, 3 * math.sqrt(p * (1 - p) / n))
    deviation = abs(stats["synthetic_frac"] - p)
    return dg.AssetCheckResult(
        passed=deviation <= tolerance,
        metadata={**stats, "deviation": round(deviation, 4), "tolerance": round(tolerance, 4)},
    )


mixed_training_set = stage_asset(
    mixed.STAGE,
    module=__name__,
    group="data",
    kinds={"json"},
    checks=[mixed_training_set_ratio],
    automation=EAGER,
    description=(
        "The blended training set: a manifest of shards, sidecars, caption type, synthetic "
        "ratio p and seed. The training loader takes the synthetic caption with probability "
        "p and the original otherwise, at sampling time, per (seed, epoch, key)."
    ),
)
