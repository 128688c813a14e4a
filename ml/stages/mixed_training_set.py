"""`mixed_training_set`: the blended training set, a manifest the training loader reads.

It names the shards, their sidecars, the caption type, the synthetic ratio p and the seed;
the loader takes the synthetic caption with probability p and the original otherwise, at
sampling time, per (seed, epoch, key).

    python -m ml.stages.mixed_training_set --config c.yaml --out DIR
"""

import os
from pathlib import Path

from ml.data.mixed import MixConfig, MixManifest, mix_stats
from ml.stage import Inputs, Log, Stage, StageResult, main

MANIFEST = "manifest.json"


def run(cfg: MixConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    shards = sorted((inputs["raw_pairs"] / "train").glob("*.tar"))
    sidecars = [inputs["recaptioned_dataset"] / f"{s.stem}.parquet" for s in shards]
    missing = [s.stem for s, sidecar in zip(shards, sidecars, strict=True) if not sidecar.exists()]
    if missing:
        raise FileNotFoundError(
            f"recaptioned_dataset lacks partitions {missing}: "
            "`dalle3 run --select recaptioned_dataset`"
        )
    # Paths relative to the manifest keep it (and its DVC hash) machine-independent; the output
    # folder sits where the asset will, beside its inputs.
    manifest = MixManifest(
        shards=[os.path.relpath(s, out) for s in shards],
        sidecars=[os.path.relpath(s, out) for s in sidecars],
        caption_type=cfg.caption_type,
        synthetic_ratio=cfg.synthetic_ratio,
        seed=cfg.seed,
    )
    manifest.save(out / MANIFEST)
    stats = mix_stats(MixManifest.load(out / MANIFEST), epoch=0)
    metrics = {k: v for k, v in stats.items() if isinstance(v, int | float)}
    return StageResult(metrics, metadata={"shards": len(shards), "epoch0_blend": stats})


STAGE = Stage("mixed_training_set", MixConfig, ("raw_pairs", "recaptioned_dataset"), run)

if __name__ == "__main__":
    main([STAGE])
