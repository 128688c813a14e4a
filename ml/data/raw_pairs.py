"""Build the raw image–text pairs: ShapeWorld splits, or existing webdataset shards re-sharded.

The output folder is the `raw_pairs` asset:

    train/{shard:05d}.tar (+ _stats.json)   web-style pairs, alt-text only in .txt
    labelled/, clip/, eval/                   fine-tuning, CLIP and eval splits (webdataset: by
                                              key hash; labelled from configured captions)
    prompts.json                              ShapeWorld only: held-out prompts by category
    source.json                               webdataset only: the source shards read
    effective_config.json                     the effective config (written by the asset)
    summary.json                              counts, skipped samples, caption length stats
    preview.png                               the first training samples, for the UI

Every file is a deterministic function of the config, so DVC hashes reproduce.
"""

import hashlib
import json
import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml.data.sample import Sample
from ml.data.shapeworld import ShapeWorldConfig, eval_prompts, generate
from ml.data.shards import ReadStats, ShardWriter, read_shard, read_shards, shard_listing
from ml.viz import image_grid

SOURCES = ("shapeworld", "webdataset")
SPLITS = ("train", "labelled", "clip", "eval")
HASHED_SPLITS = ("train", "clip", "eval")  # a webdataset source's splits by key hash
SHORT, DESCRIPTIVE = "short_caption", "descriptive_caption"  # what the captioner stages read
PREVIEW_SAMPLES = 16
SHAPEWORLD = "shapeworld"  # the generator's data version: it reads nothing that can change
KEPT = ("samples", "shards")  # ReadStats fields that are not skip counters


@dataclass
class LabelledCaptions:
    """Where a webdataset source's fine-tuning captions come from, as the paper's small
    human-captioned sets did: fields of each sample's `.json`, or a JSONL sidecar of
    `{"key", "short_caption", "descriptive_caption"}` lines (the sidecar wins)."""

    short_field: str = ""
    descriptive_field: str = ""
    sidecar: str = ""

    def configured(self) -> bool:
        return bool(self.sidecar or (self.short_field and self.descriptive_field))


@dataclass
class RawPairsConfig:
    source: str = "shapeworld"
    uri: str = ""  # webdataset source: a local folder or s3://bucket/prefix of .tar shards
    seed: int = 0
    shard_size: int = 512
    # ShapeWorld: samples per split.
    splits: dict[str, int] = field(
        default_factory=lambda: {"train": 4096, "labelled": 1024, "clip": 2048, "eval": 256}
    )
    # Webdataset: each sample's split by a hash of (seed, key); captioned samples that do not
    # land in `eval` form `labelled`.
    fractions: dict[str, float] = field(
        default_factory=lambda: {"train": 0.9, "clip": 0.05, "eval": 0.05}
    )
    labelled: LabelledCaptions = field(default_factory=LabelledCaptions)
    prompts_per_category: int = 8
    world: ShapeWorldConfig = field(default_factory=ShapeWorldConfig)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        _check_names("splits", self.splits, SPLITS, required=True)
        for split, n in self.splits.items():
            if n < 0:
                raise ValueError(f"splits.{split} must be >= 0, got {n}")
        _check_names("fractions", self.fractions, HASHED_SPLITS, required=False)
        total = sum(self.fractions.values())
        if any(f < 0 for f in self.fractions.values()) or abs(total - 1) > 1e-6:
            raise ValueError(f"fractions must be >= 0 and sum to 1, got {self.fractions}")
        if self.source == "webdataset":
            if not self.uri:
                raise ValueError("uri is required when source is 'webdataset'")
            if not self.labelled.configured():
                raise ValueError(
                    "labelled: a webdataset source needs the captioner's fine-tuning captions: "
                    "set labelled.short_field and labelled.descriptive_field (fields of each "
                    "sample's .json, e.g. img2dataset --save_additional_columns) or "
                    "labelled.sidecar (a JSONL file of {key, short_caption, descriptive_caption})"
                )
            if self.labelled.sidecar and not Path(self.labelled.sidecar).is_file():
                raise ValueError(f"labelled.sidecar: no such file {self.labelled.sidecar}")


def _check_names(what: str, given: dict[str, Any], known: tuple[str, ...], required: bool) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{what}: unknown split(s) {unknown}; known: {list(known)}")
    missing = [name for name in known if name not in given]
    if required and missing:
        raise ValueError(f"{what}: missing split(s) {missing}")


@dataclass
class SplitSummary:
    samples: int
    shards: list[str]
    caption_words: dict[str, float]


@dataclass
class RawPairsSummary:
    source: str
    splits: dict[str, SplitSummary]
    skipped: dict[str, int] = field(default_factory=dict)  # what the source reader dropped
    source_version: str = ""  # `source_fingerprint` of the listing that was read

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> "RawPairsSummary":
        data = json.loads(path.read_text())
        splits = {name: SplitSummary(**s) for name, s in data["splits"].items()}
        return cls(
            source=data["source"],
            splits=splits,
            skipped=data["skipped"],
            source_version=data.get("source_version", ""),
        )


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


def split_of(key: str, seed: int, fractions: dict[str, float]) -> str:
    """A sample's split, drawn by a hash of (seed, key): stable as shards come and go."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for split in HASHED_SPLITS:
        cumulative += fractions.get(split, 0.0)
        if u < cumulative:
            return split
    return HASHED_SPLITS[0]


def _load_sidecar(path: str) -> dict[str, dict[str, str]]:
    captions = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[row["key"]] = {SHORT: row[SHORT], DESCRIPTIVE: row[DESCRIPTIVE]}
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"labelled.sidecar {path}, line {number}: expected a JSON object with "
                f"'key', '{SHORT}' and '{DESCRIPTIVE}' ({err})"
            ) from err
    return captions


def route_webdataset(
    samples: Iterator[Sample], cfg: RawPairsConfig
) -> Iterator[tuple[str, Sample]]:
    """(split, sample) for each source sample; labelled captions under the names the
    captioner stages read."""
    sidecar = _load_sidecar(cfg.labelled.sidecar) if cfg.labelled.sidecar else {}
    fields = {SHORT: cfg.labelled.short_field, DESCRIPTIVE: cfg.labelled.descriptive_field}
    for sample in samples:
        captions = sidecar.get(sample.key) or {
            name: sample.meta[f] for name, f in fields.items() if f and sample.meta.get(f)
        }
        split = split_of(sample.key, cfg.seed, cfg.fractions)
        if len(captions) == 2 and all(isinstance(c, str) and c for c in captions.values()):
            sample.meta.update(captions)
            split = "eval" if split == "eval" else "labelled"
        yield split, sample


class _SplitWriter:
    """One shard writer per split, with each split's captions and the first train samples."""

    def __init__(self, out_dir: Path, shard_size: int, splits: tuple[str, ...]) -> None:
        self.writers = {s: ShardWriter(out_dir / s, shard_size) for s in splits}
        self.texts: dict[str, list[str]] = {s: [] for s in splits}
        self.preview: list[Sample] = []

    def write(self, split: str, sample: Sample) -> None:
        self.writers[split].write(sample)
        self.texts[split].append(sample.text)
        if split == "train" and len(self.preview) < PREVIEW_SAMPLES:
            self.preview.append(sample)

    def close(self) -> dict[str, SplitSummary]:
        return {
            split: SplitSummary(len(self.texts[split]), writer.close(), caption_word_stats(
                self.texts[split]
            ))
            for split, writer in self.writers.items()
        }


def build_raw_pairs(
    cfg: RawPairsConfig, out_dir: Path, s3: Any = None
) -> tuple[RawPairsSummary, list[Sample]]:
    """Write every split into `out_dir`; returns the summary and the first training samples."""
    writer = _SplitWriter(out_dir, cfg.shard_size, SPLITS)
    stats = ReadStats()
    version = SHAPEWORLD
    if cfg.source == "shapeworld":
        for split, n in cfg.splits.items():
            for sample in generate(n, cfg.seed, cfg.world, split):
                writer.write(split, sample)
        prompts = eval_prompts(cfg.seed, cfg.prompts_per_category)
        (out_dir / "prompts.json").write_text(json.dumps(prompts, indent=1, sort_keys=True))
    else:
        listing = shard_listing(cfg.uri, s3)
        version = fingerprint(listing)
        (out_dir / "source.json").write_text(json.dumps(listing, indent=1, sort_keys=True))
        samples = (s for entry in listing for s in read_shard(entry["uri"], stats, s3))
        for split, sample in route_webdataset(samples, cfg):
            writer.write(split, sample)
    skipped = {k: v for k, v in asdict(stats).items() if k not in KEPT}
    summary = RawPairsSummary(cfg.source, writer.close(), skipped, version)
    (out_dir / "summary.json").write_text(summary.to_json())
    if writer.preview:
        image_grid([s.image for s in writer.preview], cols=8, scale=2).save(out_dir / "preview.png")
    return summary, writer.preview


def fingerprint(listing: list[dict[str, Any]]) -> str:
    """A hash of a shard listing (names, sizes, modification times or ETags)."""
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:32]


def source_fingerprint(cfg: RawPairsConfig, s3: Any = None) -> str:
    """The data version of what `raw_pairs` reads: the generator, or the fingerprint of the
    shards' listing, so new or rewritten shards show."""
    return SHAPEWORLD if cfg.source == "shapeworld" else fingerprint(shard_listing(cfg.uri, s3))


def load_split(raw_dir: Path, split: str) -> list[Sample]:
    """Every sample of one split of a `raw_pairs` folder, in shard order."""
    folder = raw_dir / split
    if not folder.is_dir():
        raise FileNotFoundError(f"raw_pairs has no '{split}' split: {folder} is missing")
    return list(read_shards(str(folder)))
