"""Recaptioning one shard: the sidecar's content, atomicity, and resuming a killed backfill."""

from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageStat

from ml.data.recaption import read_sidecar, recaption_shard, shard_keys
from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.data.shards import ReadStats, read_shard, write_shards

N = 10


def mean_colour(images: list[Image.Image]) -> list[str]:
    """A stand-in short captioner: deterministic text from the pixels."""
    return [" ".join(str(round(v)) for v in ImageStat.Stat(im).mean) for im in images]


def size_caption(images: list[Image.Image]) -> list[str]:
    """A stand-in descriptive captioner."""
    return [f"an image of {im.width} by {im.height} pixels in {im.mode}" for im in images]


CAPTIONERS = {"ssc": mean_colour, "dsc": size_caption}


def counting(captioner: Callable, calls: list[int], fail_at: int | None = None) -> Callable:
    """Wraps a captioner to count its batches and optionally die on batch `fail_at`."""

    def wrapped(images: list[Image.Image]) -> list[str]:
        if len(calls) == fail_at:
            raise KeyboardInterrupt("killed mid-shard")
        calls.append(len(images))
        return captioner(images)

    return wrapped


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("shards")
    samples = generate(N, seed=0, cfg=ShapeWorldConfig(image_size=16), split="train")
    (name,) = write_shards(samples, out, shard_size=N)
    return str(out / name)


def test_sidecar_has_one_row_per_sample_with_every_caption(shard: str, tmp_path: Path) -> None:
    out = tmp_path / "side" / "00000.parquet"
    result = recaption_shard(shard, out, CAPTIONERS, version="v1", batch_size=4)

    samples = list(read_shard(shard, ReadStats()))
    table = pq.read_table(out)
    assert table.column_names == ["__key__", "alt_text", "ssc", "dsc", "captioner_version"]
    rows = read_sidecar(out)
    assert list(rows) == [s.key for s in samples]
    for s in samples:
        assert rows[s.key] == {
            "alt_text": s.text,
            "ssc": mean_colour([s.image])[0],
            "dsc": size_caption([s.image])[0],
            "captioner_version": "v1",
        }
    assert (
        not result.skipped_existing
        and result.samples == N
        and result.skipped == ReadStats(samples=N, shards=1)
    )
    assert result.caption_stats["dsc"]["mean"] == 9.0
    assert result.caption_stats["ssc"]["mean"] == 3.0
    assert list(out.parent.iterdir()) == [out]  # no temp file left, no image copied


def test_complete_sidecar_with_same_version_is_skipped(shard: str, tmp_path: Path) -> None:
    out = tmp_path / "00000.parquet"
    first = recaption_shard(shard, out, CAPTIONERS, version="v1", batch_size=4)
    before = out.read_bytes()
    calls: list[int] = []
    again = recaption_shard(
        shard, out, {"ssc": counting(mean_colour, calls), "dsc": size_caption}, "v1", 4
    )
    assert again.skipped_existing and calls == []
    assert out.read_bytes() == before
    assert again.samples == N and again.skipped == first.skipped
    assert again.caption_stats == first.caption_stats


def test_other_version_or_captioners_are_recomputed(shard: str, tmp_path: Path) -> None:
    out = tmp_path / "00000.parquet"
    recaption_shard(shard, out, CAPTIONERS, version="v1", batch_size=4)
    calls: list[int] = []
    result = recaption_shard(
        shard, out, {"ssc": counting(mean_colour, calls), "dsc": size_caption}, "v2", 4
    )
    assert not result.skipped_existing and calls == [4, 4, 2]
    assert {row["captioner_version"] for row in read_sidecar(out).values()} == {"v2"}

    result = recaption_shard(shard, out, {"ssc": mean_colour}, version="v2", batch_size=4)
    assert not result.skipped_existing
    assert pq.read_table(out).column_names == ["__key__", "alt_text", "ssc", "captioner_version"]


def test_sidecar_of_another_shard_is_recomputed(shard: str, tmp_path: Path) -> None:
    other_dir = tmp_path / "other"
    samples = generate(N, seed=0, cfg=ShapeWorldConfig(image_size=16), split="train", start=5)
    (name,) = write_shards(samples, other_dir, shard_size=N)
    out = tmp_path / "00000.parquet"
    recaption_shard(str(other_dir / name), out, CAPTIONERS, version="v1", batch_size=4)

    result = recaption_shard(shard, out, CAPTIONERS, version="v1", batch_size=4)
    assert not result.skipped_existing
    assert list(read_sidecar(out)) == shard_keys(shard)


def test_killed_run_leaves_no_sidecar_and_rerun_completes(shard: str, tmp_path: Path) -> None:
    out = tmp_path / "00000.parquet"
    calls: list[int] = []
    killed = {"ssc": counting(mean_colour, calls, fail_at=1), "dsc": size_caption}
    with pytest.raises(KeyboardInterrupt):
        recaption_shard(shard, out, killed, version="v1", batch_size=4)
    assert list(tmp_path.iterdir()) == []

    result = recaption_shard(shard, out, CAPTIONERS, version="v1", batch_size=4)
    assert not result.skipped_existing
    assert sorted(read_sidecar(out)) == sorted(shard_keys(shard))
    assert pq.read_table(out).num_rows == N


def test_truncated_sidecar_and_stale_temp_file_are_replaced(shard: str, tmp_path: Path) -> None:
    out = tmp_path / "00000.parquet"
    recaption_shard(shard, out, CAPTIONERS, version="v1", batch_size=4)
    out.write_bytes(out.read_bytes()[:-100])  # a sidecar cut short, e.g. by a full disk
    stale = out.with_name(out.name + ".tmp")
    stale.write_bytes(b"half a parquet file")

    result = recaption_shard(shard, out, CAPTIONERS, version="v1", batch_size=4)
    assert not result.skipped_existing
    keys = pq.read_table(out).column("__key__").to_pylist()
    assert len(keys) == len(set(keys)) == N
    assert not stale.exists()


def test_shard_with_an_undecodable_image_is_still_skipped_on_rerun(tmp_path: Path) -> None:
    samples = list(generate(4, seed=0, cfg=ShapeWorldConfig(image_size=16), split="train"))
    shard_dir = tmp_path / "shards"
    (name,) = write_shards(samples, shard_dir, shard_size=4)
    shard = shard_dir / name
    data = bytearray(shard.read_bytes())
    # Corrupt the second image's PNG signature: its sample is skipped, the rest decode.
    second = data.find(b"\x89PNG", data.find(b"\x89PNG") + 1)
    data[second : second + 8] = b"notapng!"
    shard.write_bytes(bytes(data))

    out = tmp_path / "00000.parquet"
    first = recaption_shard(str(shard), out, CAPTIONERS, version="v1", batch_size=4)
    assert first.samples == 3 and first.skipped.skipped_images == 1
    again = recaption_shard(str(shard), out, CAPTIONERS, version="v1", batch_size=4)
    assert again.skipped_existing and again.skipped.skipped_images == 1


def test_bad_arguments_are_refused(shard: str, tmp_path: Path) -> None:
    out = tmp_path / "x.parquet"
    with pytest.raises(ValueError, match="batch_size"):
        recaption_shard(shard, out, CAPTIONERS, version="v1", batch_size=0)
    with pytest.raises(ValueError, match="alt_text"):
        recaption_shard(shard, out, {"alt_text": mean_colour}, version="v1", batch_size=4)
    with pytest.raises(ValueError, match="returned 0 captions"):
        recaption_shard(shard, out, {"ssc": lambda images: []}, version="v1", batch_size=4)
    assert not out.exists()
