"""`raw_pairs`: the image–text pairs everything else learns from, as webdataset shards.

ShapeWorld's generator with web-style noisy alt-text, or existing shards from a folder or
s3:// prefix, routed into the train / labelled / clip / eval splits.

    python -m ml.stages.raw_pairs --config c.yaml --out DIR
"""

import time
from dataclasses import asdict
from pathlib import Path

from ml.data.raw_pairs import RawPairsConfig, build_raw_pairs
from ml.stage import Inputs, Log, Stage, StageResult, main


def run(cfg: RawPairsConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    s3 = inputs.s3_client() if cfg.uri.startswith("s3://") else None
    start = time.perf_counter()
    summary, preview = build_raw_pairs(cfg, out, s3=s3)
    seconds = time.perf_counter() - start
    splits = summary.splits
    total = sum(s.samples for s in splits.values())
    return StageResult(
        metrics={"samples": total},
        speed={"samples_per_s": total / seconds},
        metadata={
            "samples_per_split": {k: s.samples for k, s in splits.items()},
            "shards": {k: s.shards for k, s in splits.items()},
            "skipped": summary.skipped,
            "source_version": summary.source_version,
            "caption_words": splits["train"].caption_words,
        },
        examples=[(s.image, s.text) for s in preview],
        files={"summary.json": asdict(summary)},
    )


STAGE = Stage("raw_pairs", RawPairsConfig, (), run)

if __name__ == "__main__":
    main([STAGE])
