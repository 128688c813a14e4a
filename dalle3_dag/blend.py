"""`recaptioned_dataset` (one partition per shard) and `mixed_training_set` (the blend)."""

import itertools
import math
import os
from pathlib import Path

import dagster as dg
import mlflow

from dalle3_dag.metadata import captioned_images
from dalle3_dag.partitions import SHARDS
from dalle3_dag.project import effective_params, resolve
from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource
from dalle3_dag.versioning import (
    check_specs,
    commit,
    folder_check,
    staged,
    tracked_run,
    write_config,
)
from ml.captioner.stages import ImageCaptioner
from ml.data.mixed import BlendConfig, MixManifest, blend_stats
from ml.data.recaption import RecaptionConfig, read_sidecar, recaption_shard
from ml.data.shards import ReadStats, read_shard

RAW, CLIP, RECAP, MIX = "raw_pairs", "clip_encoder", "recaptioned_dataset", "mixed_training_set"
SYNTHETIC = ("ssc", "dsc")
MANIFEST = "manifest.json"
EXAMPLES = 6


class RecaptionParams(dg.Config):
    """Overrides of params.yaml's `recaptioned_dataset` section."""

    batch_size: int | None = None
    max_new_tokens: int | None = None


@dg.asset(
    key=RECAP,
    deps=[RAW, CLIP, *(f"captioner_{name}" for name in SYNTHETIC)],
    partitions_def=SHARDS,
    backfill_policy=dg.BackfillPolicy.multi_run(1),
    group_name="data",
    kinds={"pytorch", "parquet", "dvc"},
    code_version="1",
    description=(
        "Per-shard Parquet sidecars keyed by __key__: the alt-text, the SSC and DSC captions "
        "and the captioner versions. Images are never copied. One partition per raw_pairs "
        "shard; a shard whose sidecar is complete for the same captioners is skipped."
    ),
)
def recaptioned_dataset(
    context: dg.AssetExecutionContext,
    config: RecaptionParams,
    storage: StorageResource,
    mlflow_tracker: MlflowResource,
    dvc: DvcResource,
) -> dg.MaterializeResult:
    cfg = resolve(RecaptionConfig, RECAP, config)
    shard = storage.asset_dir(RAW) / "train" / f"{context.partition_key}.tar"
    if not shard.is_file():
        raise FileNotFoundError(f"partition {context.partition_key}: no shard {shard}")
    upstream = [RAW, CLIP, *(f"captioner_{name}" for name in SYNTHETIC)]
    # The sidecar is reused only if every input is the same version as when it was written.
    version = " ".join(f"{name}={dvc.out_hash(name) or 'unversioned'}" for name in upstream)
    captioners = {
        name: ImageCaptioner(
            storage.asset_dir(CLIP), storage.asset_dir(f"captioner_{name}"), cfg.max_new_tokens
        )
        for name in SYNTHETIC
    }
    out = storage.asset_dir(RECAP) / f"{context.partition_key}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tracked_run(context, mlflow_tracker, dvc):
        mlflow_tracker.log_config(cfg)
        result = recaption_shard(str(shard), out, captioners, version, cfg.batch_size)
        mlflow.log_metrics({"samples": result.samples, "samples_per_s": result.samples_per_s})
        rows = read_sidecar(out)
        firsts = itertools.islice(read_shard(str(shard), ReadStats()), EXAMPLES)
        examples = [
            (s.image, f"**alt:** {s.text}<br>**dsc:** {rows[s.key]['dsc']}")
            for s in firsts
            if s.key in rows
        ]
        # Each partition's sidecar sits beside the effective config that made it.
        write_config(out.with_suffix(".config.json"), cfg)
        metadata = {
            "samples": dg.MetadataValue.int(result.samples),
            "samples_per_s": dg.MetadataValue.float(round(result.samples_per_s, 1)),
            "resumed_from_existing_sidecar": result.skipped_existing,
            "skipped": dg.MetadataValue.json(vars(result.skipped)),
            "caption_words": dg.MetadataValue.json(result.caption_stats),
            "captioner_version": version,
            "examples": captioned_images(examples),
        }
        return commit(RECAP, storage, dvc, metadata, {RECAP: effective_params(RECAP, config)})


class BlendParams(dg.Config):
    """Overrides of params.yaml's `mixed_training_set` section."""

    caption_type: str | None = None  # alt | ssc | dsc
    synthetic_ratio: float | None = None
    seed: int | None = None


@folder_check(
    "The epoch-0 blend takes the synthetic caption at rate p, within sampling noise "
    "(3 standard deviations, at least 1 point); empty captions that forced a fallback count "
    "against it."
)
def mixed_training_set_ratio(folder: Path) -> dg.AssetCheckResult:
    manifest = MixManifest.load(folder / MANIFEST)
    stats = blend_stats(manifest, epoch=0)
    p, n = manifest.synthetic_ratio, max(1, stats["samples"])
    tolerance = max(0.01, 3 * math.sqrt(p * (1 - p) / n))
    deviation = abs(stats["synthetic_frac"] - p)
    return dg.AssetCheckResult(
        passed=deviation <= tolerance,
        metadata={**stats, "deviation": round(deviation, 4), "tolerance": round(tolerance, 4)},
    )


@dg.asset(
    key=MIX,
    deps=[RAW, RECAP],
    group_name="data",
    kinds={"json", "dvc"},
    code_version="2",
    check_specs=check_specs(MIX, [mixed_training_set_ratio]),
    description=(
        "The blended training set: a manifest of shards, sidecars, caption type, synthetic "
        "ratio p and seed. The training loader takes the synthetic caption with probability "
        "p and the original otherwise, at sampling time, per (seed, epoch, key)."
    ),
)
def mixed_training_set(
    context: dg.AssetExecutionContext,
    config: BlendParams,
    storage: StorageResource,
    mlflow_tracker: MlflowResource,
    dvc: DvcResource,
) -> dg.MaterializeResult:
    cfg = resolve(BlendConfig, MIX, config)
    shards = sorted((storage.asset_dir(RAW) / "train").glob("*.tar"))
    sidecars = [storage.asset_dir(RECAP) / f"{s.stem}.parquet" for s in shards]
    missing = [s.stem for s, sidecar in zip(shards, sidecars, strict=True) if not sidecar.exists()]
    if missing:
        raise FileNotFoundError(
            f"recaptioned_dataset lacks partitions {missing}: `dalle3 run --select {RECAP}`"
        )
    with tracked_run(context, mlflow_tracker, dvc):
        with staged(context, MIX, storage, cfg, [mixed_training_set_ratio]) as stage:
            # Paths relative to the manifest keep it (and its DVC hash) machine-independent.
            manifest = MixManifest(
                shards=[os.path.relpath(s, storage.asset_dir(MIX)) for s in shards],
                sidecars=[os.path.relpath(s, storage.asset_dir(MIX)) for s in sidecars],
                caption_type=cfg.caption_type,
                synthetic_ratio=cfg.synthetic_ratio,
                seed=cfg.seed,
            )
            manifest.save(stage.path / MANIFEST)
            stats = blend_stats(MixManifest.load(stage.path / MANIFEST), epoch=0)
        mlflow_tracker.log_config(cfg)
        mlflow.log_metrics({k: v for k, v in stats.items() if isinstance(v, int | float)})
        metadata = {
            "shards": dg.MetadataValue.int(len(shards)),
            "epoch0_blend": dg.MetadataValue.json(stats),
            "synthetic_frac": dg.MetadataValue.float(stats["synthetic_frac"]),
        }
        params = {MIX: effective_params(MIX, config)}
        return commit(MIX, storage, dvc, metadata, params, stage.checks)
