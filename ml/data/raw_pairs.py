"""Build the raw image–text pairs: ShapeWorld splits, or existing webdataset shards re-sharded.

The output folder is the `raw_pairs` asset:

    train/{shard:05d}.tar (+ _stats.json)   web-style pairs, alt-text only in .txt
    labelled/, clip/, eval/                   ShapeWorld only: fine-tuning, CLIP and eval splits
    prompts.json                              ShapeWorld only: held-out prompts by category
    summary.json                              counts, skipped samples, caption length stats
    preview.png                               the first training samples, for the UI

Every file is a deterministic function of the config, so DVC hashes reproduce.
"""

import json
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml.data.sample import Sample
from ml.data.shapeworld import ShapeWorldConfig, eval_prompts, generate
from ml.data.shards import ReadStats, ShardWriter, read_shards
from ml.viz import image_grid

SOURCES = ("shapeworld", "webdataset")
PREVIEW_SAMPLES = 16
KEPT = ("samples", "shards")  # ReadStats fields that are not skip counters


@dataclass
class RawPairsConfig:
    source: str = "shapeworld"
    uri: str = ""  # webdataset source: a local folder or s3://bucket/prefix of .tar shards
    seed: int = 0
    shard_size: int = 512
    splits: dict[str, int] = field(
        default_factory=lambda: {"train": 4096, "labelled": 1024, "clip": 2048, "eval": 256}
    )
    prompts_per_category: int = 8
    world: ShapeWorldConfig = field(default_factory=ShapeWorldConfig)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "webdataset" and not self.uri:
            raise ValueError("uri is required when source is 'webdataset'")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        for split, n in self.splits.items():
            if n < 0:
                raise ValueError(f"splits.{split} must be >= 0, got {n}")


@dataclass
class SplitSummary:
    samples: int
    shards: list[str]
    skipped: dict[str, int]
    caption_words: dict[str, float]


@dataclass
class RawPairsSummary:
    source: str
    splits: dict[str, SplitSummary]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> "RawPairsSummary":
        data = json.loads(path.read_text())
        splits = {name: SplitSummary(**s) for name, s in data["splits"].items()}
        return cls(source=data["source"], splits=splits)


def caption_word_stats(texts: list[str]) -> dict[str, float]:
    """Length distribution of captions in words; empty captions count as zero words."""
    if not texts:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0, "empty_frac": 0.0}
    words = sorted(len(t.split()) for t in texts)
    return {
        "count": len(words),
        "mean": round(statistics.fmean(words), 3),
        "p50": float(words[len(words) // 2]),
        "p90": float(words[min(len(words) - 1, int(0.9 * len(words)))]),
        "max": float(words[-1]),
        "empty_frac": round(sum(w == 0 for w in words) / len(words), 4),
    }


def _write_split(
    samples: Iterable[Sample], out: Path, shard_size: int
) -> tuple[list[str], list[str], list[Sample]]:
    """Write one split; returns its shard names, every caption and the first few samples."""
    texts: list[str] = []
    preview: list[Sample] = []
    with ShardWriter(out, shard_size) as writer:
        for sample in samples:
            writer.write(sample)
            texts.append(sample.text)
            if len(preview) < PREVIEW_SAMPLES:
                preview.append(sample)
    return writer.close(), texts, preview


def build_raw_pairs(
    cfg: RawPairsConfig, out_dir: Path, s3: Any = None
) -> tuple[RawPairsSummary, list[Sample]]:
    """Write every split into `out_dir`; returns the summary and the first training samples."""
    splits: dict[str, SplitSummary] = {}
    preview: list[Sample] = []
    sources: dict[str, tuple[Iterator[Sample], ReadStats | None]] = {}
    if cfg.source == "shapeworld":
        for split, n in cfg.splits.items():
            sources[split] = (generate(n, cfg.seed, cfg.world, split), None)
        prompts = eval_prompts(cfg.seed, cfg.prompts_per_category)
        (out_dir / "prompts.json").write_text(json.dumps(prompts, indent=1, sort_keys=True))
    else:
        stats = ReadStats()
        sources["train"] = (read_shards(cfg.uri, stats, s3=s3), stats)

    for split, (samples, stats) in sources.items():
        shards, texts, split_preview = _write_split(samples, out_dir / split, cfg.shard_size)
        skipped = {k: v for k, v in asdict(stats).items() if k not in KEPT} if stats else {}
        splits[split] = SplitSummary(len(texts), shards, skipped, caption_word_stats(texts))
        if split == "train":
            preview = split_preview

    summary = RawPairsSummary(source=cfg.source, splits=splits)
    (out_dir / "summary.json").write_text(summary.to_json())
    if preview:
        image_grid([s.image for s in preview], cols=8, scale=2).save(out_dir / "preview.png")
    return summary, preview


def load_split(raw_dir: Path, split: str) -> list[Sample]:
    """Every sample of one split of a `raw_pairs` folder, in shard order."""
    folder = raw_dir / split
    if not folder.is_dir():
        raise FileNotFoundError(f"raw_pairs has no '{split}' split: {folder} is missing")
    return list(read_shards(str(folder)))
