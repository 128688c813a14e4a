"""Recaption one shard: a Parquet sidecar of synthetic captions keyed by `__key__`.

The `recaptioned_dataset` asset is partitioned by shard and calls `recaption_shard` once per
partition. A sidecar holds text only, one row per sample the shard reader delivers:

    __key__ | alt_text | <one column per captioner, e.g. ssc, dsc> | captioner_version

Images are never copied: the training loader reads them from the original shards and joins the
captions by key (`ml.data.mixed`), so recaptioning costs disk space for text alone.

A sidecar is written in one atomic rename, so a killed partition leaves either no sidecar or a
complete one. A rerun skips a shard whose sidecar is complete, made by the same captioner version
and covers the shard's current keys, which makes backfills resumable at shard granularity.
"""

import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ml.data.raw_pairs import caption_word_stats
from ml.data.shards import ReadStats, read_shard, shard_keys, write_atomic

KEY = "__key__"
ALT_TEXT = "alt_text"
VERSION = "captioner_version"
RESERVED = (KEY, ALT_TEXT, VERSION)
METADATA_KEY = b"recaption"  # Parquet schema metadata: the ReadStats of the run that wrote it

Captioner = Callable[[list[Image.Image]], list[str]]


@dataclass
class RecaptionResult:
    """What one partition did, for the asset's metadata.

    On a skipped shard, `skipped` is the ReadStats stored by the run that wrote the sidecar,
    the caption statistics are read back from it and `samples_per_s` is 0.
    """

    shard: str
    path: str
    samples: int
    seconds: float
    samples_per_s: float
    skipped: ReadStats
    skipped_existing: bool
    caption_stats: dict[str, dict[str, float]] = field(default_factory=dict)


def recaption_shard(
    shard_uri: str,
    out_path: Path,
    captioners: dict[str, Captioner],
    version: str,
    batch_size: int,
) -> RecaptionResult:
    """Caption every image of one shard with every captioner and write the sidecar `out_path`.

    `version` identifies the captioners (e.g. their checkpoint hashes); a sidecar with another
    version is recomputed. The resume check compares keys, not image bytes, so if the shard can
    be regenerated with the same keys, put its data version into `version` as well.
    """
    _check_captioners(captioners)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out_path = Path(out_path)
    start = time.perf_counter()
    existing = _complete_sidecar(out_path, shard_uri, list(captioners), version)
    if existing is not None:
        table, stats = existing
        kept = {name: table.column(name).to_pylist() for name in (ALT_TEXT, *captioners)}
        return _result(shard_uri, out_path, kept, stats, time.perf_counter() - start, True)

    stats = ReadStats()
    columns: dict[str, list[str]] = {KEY: [], ALT_TEXT: [], **{name: [] for name in captioners}}
    batch: list[Image.Image] = []
    for sample in read_shard(shard_uri, stats):
        columns[KEY].append(sample.key)
        columns[ALT_TEXT].append(sample.text)
        batch.append(sample.image)
        if len(batch) == batch_size:
            _caption_batch(batch, captioners, columns)
            batch = []
    if batch:
        _caption_batch(batch, captioners, columns)
    columns[VERSION] = [version] * len(columns[KEY])

    schema = pa.schema(
        [(name, pa.string()) for name in columns],  # explicit, so an empty shard types alike
        metadata={METADATA_KEY: json.dumps(asdict(stats), sort_keys=True).encode()},
    )
    table = pa.table(columns, schema=schema)
    buffer = io.BytesIO()  # a sidecar is text only: small enough to build in memory
    pq.write_table(table, buffer)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, buffer.getvalue())
    seconds = time.perf_counter() - start
    return _result(shard_uri, out_path, columns, stats, seconds, False)


def read_sidecar(path: Path) -> dict[str, dict[str, str]]:
    """Every row of a sidecar as {key: {column: value}}, without the key column."""
    rows = pq.read_table(path).to_pylist()
    return {row.pop(KEY): row for row in rows}


def _check_captioners(captioners: dict[str, Captioner]) -> None:
    if not captioners:
        raise ValueError("captioners must name at least one captioner")
    for name in captioners:
        if not name or name in RESERVED:
            raise ValueError(f"captioner name {name!r} is empty or a reserved column {RESERVED}")


def _caption_batch(
    images: list[Image.Image], captioners: dict[str, Captioner], columns: dict[str, list[str]]
) -> None:
    for name, captioner in captioners.items():
        captions = captioner(images)
        if len(captions) != len(images):
            raise ValueError(
                f"captioner {name!r} returned {len(captions)} captions for {len(images)} images"
            )
        columns[name].extend(captions)


def _complete_sidecar(
    path: Path, shard_uri: str, names: list[str], version: str
) -> tuple[pa.Table, ReadStats] | None:
    """The existing sidecar and its stored ReadStats if it can be kept as is, else None.

    Kept when it reads, has exactly the expected columns, every row has `version`, and its keys
    are the shard's current keys: every key in the sidecar is in the shard, and the shard's
    remaining keys are exactly as many as the samples the writing run skipped for their image
    or their alt-text.
    """
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        stats = ReadStats(**json.loads(table.schema.metadata[METADATA_KEY]))
    except (OSError, ValueError, KeyError, TypeError):  # cut off, not Parquet, foreign metadata
        return None
    if table.column_names != [KEY, ALT_TEXT, *names, VERSION]:
        return None
    if set(table.column(VERSION).to_pylist()) - {version}:
        return None
    keys = shard_keys(shard_uri)
    sidecar_keys = table.column(KEY).to_pylist()
    skipped = stats.skipped_images + stats.skipped_captions
    if not set(sidecar_keys) <= set(keys) or len(keys) != len(sidecar_keys) + skipped:
        return None
    return table, stats


def _result(
    shard_uri: str,
    out_path: Path,
    columns: dict[str, list[str]],
    stats: ReadStats,
    seconds: float,
    skipped_existing: bool,
) -> RecaptionResult:
    texts = {name: values for name, values in columns.items() if name not in (KEY, VERSION)}
    samples = len(texts[ALT_TEXT])
    return RecaptionResult(
        shard=shard_uri,
        path=str(out_path),
        samples=samples,
        seconds=round(seconds, 3),
        samples_per_s=0.0 if skipped_existing else round(samples / max(seconds, 1e-9), 2),
        skipped=stats,
        skipped_existing=skipped_existing,
        caption_stats={name: caption_word_stats(values) for name, values in texts.items()},
    )


@dataclass
class RecaptionConfig:
    """How the `recaptioned_dataset` stage decodes: batch size, caption length cap, and greedy
    (`top_p` 0) or nucleus sampling with `top_p` from `seed`."""

    batch_size: int = 64
    max_new_tokens: int = 80
    top_p: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1] (0: greedy), got {self.top_p}")
