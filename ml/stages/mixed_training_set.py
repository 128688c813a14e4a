"""`mixed_training_set`: the blended training set, a manifest the training loader reads.

It names the shards, their sidecars, the caption type, the synthetic ratio p and the seed;
the loader takes the synthetic caption with probability p and the original otherwise, at
sampling time, per (seed, epoch, key).

    python -m ml.stages.mixed_training_set --config c.yaml --out DIR
"""

import dataclasses
import os
from pathlib import Path

from ml.data.mixed import MixConfig, MixManifest, mix_stats
from ml.stage import Inputs, Log, Stage, StageResult, main

MANIFEST = "manifest.json"


def blend_manifest(
    cfg: MixConfig, raw: Path, recaptioned: Path, out: Path, home: Path | None = None
) -> MixManifest:
    """The manifest of `cfg`'s blend of every training shard, saved in `out` with paths
    relative to `home`, the folder it will live in (default `out`); returned with the paths as
    found."""
    shards = sorted((raw / "train").glob("*.tar"))
    sidecars = [recaptioned / f"{s.stem}.parquet" for s in shards]
    missing = [s.stem for s, sidecar in zip(shards, sidecars, strict=True) if not sidecar.exists()]
    if missing:
        raise FileNotFoundError(
            f"recaptioned_dataset lacks partitions {missing}: "
            "`dalle3 run --select recaptioned_dataset`"
        )
    # Paths relative to the manifest keep it (and its DVC hash) machine-independent; a staged
    # version's folder sits beside the live one, so by default it is its own home.
    home = home or out
    manifest = MixManifest(
        shards=[os.path.relpath(s, home) for s in shards],
        sidecars=[os.path.relpath(s, home) for s in sidecars],
        caption_type=cfg.caption_type,
        synthetic_ratio=cfg.synthetic_ratio,
        seed=cfg.seed,
    )
    manifest.save(out / MANIFEST)
    return dataclasses.replace(
        manifest, shards=[str(s) for s in shards], sidecars=[str(s) for s in sidecars]
    )


def run(cfg: MixConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    manifest = blend_manifest(cfg, inputs["raw_pairs"], inputs["recaptioned_dataset"], out)
    stats = mix_stats(manifest, epoch=0)
    metrics = {k: v for k, v in stats.items() if isinstance(v, int | float)}
    return StageResult(metrics, metadata={"shards": len(manifest.shards), "epoch0_blend": stats})


STAGE = Stage("mixed_training_set", MixConfig, ("raw_pairs", "recaptioned_dataset"), run)

if __name__ == "__main__":
    main([STAGE])
