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
    # A sidecar is reused only if every input is the same version as when it was written and
    # it was decoded the same way.
    version = " ".join(
        [f"{key}={inputs.versions.get(key, 'unversioned')}" for key in INPUTS]
        + [f"{name}={value}" for name, value in sorted(to_dict(cfg).items())]
    )
    captioners = {
        name: ImageCaptioner(
            inputs["clip_encoder"],
            inputs[f"captioner_{name}"],
            cfg.max_new_tokens,
            cfg.top_p,
            cfg.seed,
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
    quality = caption_quality(shards, out)
    examples = [
        (s.image, f"**alt:** {s.text}<br>**dsc:** {rows[s.key]['dsc']}")
        for s in firsts
        if s.key in rows
    ]
    return StageResult(
        metrics={"samples": samples, **quality},
        speed={"samples_per_s": samples / max(seconds, 1e-9)},
        metadata={
            "shards": names,
            "reused_sidecars": reused,
            "skipped": {"images": skipped.skipped_images, "captions": skipped.skipped_captions},
            "captioner_version": version,
        },
        examples=examples,
    )


def caption_quality(shards: list[Path], out: Path) -> dict[str, float]:
    """The captions written, scored against the scene graphs where the samples carry them
    (ShapeWorld): what the text-to-image model will train on, as the captioners' own checks
    score their greedy captions of the eval split."""
    from ml.data.shapeworld import scene_of
    from ml.eval.captions import evaluate_dsc, evaluate_ssc

    captions: dict[str, list[str]] = {name: [] for name in SYNTHETIC}
    scenes = []
    for shard in shards:
        rows = read_sidecar(out / f"{shard.stem}.parquet")
        for sample in read_shard(str(shard), ReadStats()):
            scene = scene_of(sample)
            if scene is None:
                return {}
            if sample.key in rows:
                scenes.append(scene)
                for name in SYNTHETIC:
                    captions[name].append(rows[sample.key][name])
    dsc = evaluate_dsc(captions["dsc"], scenes)
    return {
        "dsc_attribute_recall": dsc["recall"],
        "dsc_attribute_precision": dsc["precision"],
        "ssc_main_object_accuracy": evaluate_ssc(captions["ssc"], scenes)["main_object_accuracy"],
    }


STAGE = Stage("recaptioned_dataset", RecaptionConfig, INPUTS, run)

if __name__ == "__main__":
    main([STAGE])
