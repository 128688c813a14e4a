"""`recaptioned_dataset`: every training image captioned by the SSC and DSC captioners.

One Parquet sidecar per `raw_pairs/train` shard, keyed by `__key__`: the alt-text, both
synthetic captions and the captioners' versions; images are never copied. A shard whose
sidecar is complete for the same captioners is kept as it is, so a rerun only does what is
missing. The shards to caption are the stage's partitions (default: every shard).

    python -m ml.stages.recaptioned_dataset --config c.yaml --out DIR [--partition 00000 ...]
"""

import itertools
from pathlib import Path

from ml.config import to_dict
from ml.data.recaption import RecaptionConfig, read_sidecar, recaption_shard
from ml.data.shards import ReadStats, read_shard
from ml.files import write_json
from ml.stage import Inputs, Log, Stage, StageResult, main

SYNTHETIC = ("ssc", "dsc")
INPUTS = ("raw_pairs", "clip_encoder", "captioner_ssc", "captioner_dsc")
EXAMPLES = 6


def run(cfg: RecaptionConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    from ml.captioner.generate import ImageCaptioner

    train = inputs["raw_pairs"] / "train"
    names = inputs.partitions or sorted(p.stem for p in train.glob("*.tar"))
    shards = [train / f"{name}.tar" for name in names]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"no such raw_pairs shard(s): {missing}")
    # A sidecar is reused only if every input is the same version as when it was written.
    version = " ".join(f"{key}={inputs.versions.get(key, 'unversioned')}" for key in INPUTS)
    captioners = {
        name: ImageCaptioner(
            inputs["clip_encoder"], inputs[f"captioner_{name}"], cfg.max_new_tokens
        )
        for name in SYNTHETIC
    }
    samples, seconds, reused, skipped = 0, 0.0, [], ReadStats()
    for done, shard in enumerate(shards):
        sidecar = out / f"{shard.stem}.parquet"
        result = recaption_shard(str(shard), sidecar, captioners, version, cfg.batch_size)
        # Each sidecar sits beside the effective config that made it.
        write_json(sidecar.with_suffix(".config.json"), to_dict(cfg))
        samples, seconds = samples + result.samples, seconds + result.seconds
        skipped.skipped_images += result.skipped.skipped_images
        skipped.skipped_captions += result.skipped.skipped_captions
        if result.skipped_existing:
            reused.append(shard.stem)
        log.metrics(
            done + 1,
            len(shards),
            {"samples": samples, "samples_per_s": samples / max(seconds, 1e-9)},
        )
    rows = read_sidecar(out / f"{shards[0].stem}.parquet")
    firsts = itertools.islice(read_shard(str(shards[0]), ReadStats()), EXAMPLES)
    examples = [
        (s.image, f"**alt:** {s.text}<br>**dsc:** {rows[s.key]['dsc']}")
        for s in firsts
        if s.key in rows
    ]
    return StageResult(
        metrics={"samples": samples},
        speed={"samples_per_s": samples / max(seconds, 1e-9)},
        metadata={
            "shards": names,
            "reused_sidecars": reused,
            "skipped": {"images": skipped.skipped_images, "captions": skipped.skipped_captions},
            "captioner_version": version,
        },
        examples=examples,
    )


STAGE = Stage("recaptioned_dataset", RecaptionConfig, INPUTS, run)

if __name__ == "__main__":
    main([STAGE])
