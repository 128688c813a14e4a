"""Tests of the shard writer and reader: round trip, determinism, atomicity, bad data, S3."""

import io
import json
import random
import tarfile
from pathlib import Path
from typing import Any

import boto3
import pytest
import webdataset as wds
from PIL import Image

from ml.data.sample import Sample
from ml.data.shards import (
    ReadStats,
    ShardWriter,
    list_shards,
    read_shard,
    read_shards,
    write_shards,
)


def make_samples(count: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    return [
        Sample(
            key=f"{i:06d}",
            image=Image.frombytes("RGB", (32, 32), rng.randbytes(32 * 32 * 3)),
            text=f"a red circle number {i} — ünïcode",
            meta={"index": i, "shapes": ["circle"], "seed": seed},
        )
        for i in range(count)
    ]


def as_records(samples: list[Sample]) -> list[tuple[Any, ...]]:
    """Everything a sample carries, comparable with ==."""
    return [(s.key, s.text, s.meta, s.image.mode, s.image.size, s.image.tobytes()) for s in samples]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    return [
        (f"{sample.key}.png", png_bytes(sample.image)),
        (f"{sample.key}.txt", sample.text.encode()),
        (f"{sample.key}.json", json.dumps(sample.meta).encode()),
    ]


def write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with exactly these members, for shards the writer would refuse to produce."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_round_trip(tmp_path: Path) -> None:
    samples = make_samples(25)
    names = write_shards(samples, tmp_path, shard_size=10)

    assert names == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names + ["00000_stats.json", "00001_stats.json", "00002_stats.json"]
    )
    counts = [json.loads((tmp_path / f"{i:05d}_stats.json").read_text())["count"] for i in range(3)]
    assert counts == [10, 10, 5]

    stats = ReadStats()
    assert as_records(list(read_shards(str(tmp_path), stats))) == as_records(samples)
    assert stats == ReadStats(samples=25, shards=3)

    # Plain webdataset reads the same folder unchanged.
    paths = list_shards(str(tmp_path))
    assert paths == [str(tmp_path / name) for name in names]
    decoded = list(wds.WebDataset(paths, shardshuffle=False).decode("pil"))
    assert [d["__key__"] for d in decoded] == [s.key for s in samples]
    assert [d["txt"] for d in decoded] == [s.text for s in samples]
    assert [d["json"] for d in decoded] == [s.meta for s in samples]
    assert [d["png"].tobytes() for d in decoded] == [s.image.tobytes() for s in samples]


def test_members_are_consecutive_with_fixed_headers(tmp_path: Path) -> None:
    write_shards(make_samples(2), tmp_path, shard_size=10)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "000000.png",
        "000000.txt",
        "000000.json",
        "000001.png",
        "000001.txt",
        "000001.json",
    ]
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {
        (0, 0o644, 0, 0, "", "")
    }


def test_jpg_format(tmp_path: Path) -> None:
    samples = make_samples(3)
    write_shards(samples, tmp_path, shard_size=10, image_format="jpg")
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert tar.getnames()[0] == "000000.jpg"
    read = list(read_shards(str(tmp_path)))
    assert [(s.key, s.image.size, s.image.mode) for s in read] == [
        (s.key, (32, 32), "RGB") for s in samples
    ]


def test_output_is_byte_deterministic(tmp_path: Path) -> None:
    write_shards(make_samples(25), tmp_path / "a", shard_size=10)
    write_shards(make_samples(25), tmp_path / "b", shard_size=10)
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("key", ["has.dot", "has/slash", ""])
def test_bad_key_raises(tmp_path: Path, key: str) -> None:
    sample = make_samples(1)[0]
    sample.key = key
    with ShardWriter(tmp_path, shard_size=10) as writer, pytest.raises(ValueError, match=repr(key)):
        writer.write(sample)


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_format"):
        ShardWriter(tmp_path, shard_size=10, image_format="gif")
    with pytest.raises(ValueError, match="shard_size"):
        ShardWriter(tmp_path, shard_size=0)


def test_shard_appears_under_final_name_only_when_complete(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, shard_size=10)
    for sample in make_samples(5):
        writer.write(sample)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar.tmp"]
    assert list_shards(str(tmp_path)) == []

    assert writer.close() == ["00000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00000_stats.json"]


def test_error_in_writer_discards_open_shard_only(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, shard_size=10) as writer:
        for sample in make_samples(15):
            writer.write(sample)
        raise RuntimeError("stage failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00000_stats.json"]


def test_empty_writer_writes_nothing(tmp_path: Path) -> None:
    assert write_shards([], tmp_path, shard_size=10) == []
    assert list(tmp_path.iterdir()) == []


def test_corrupt_image_and_truncated_shard_are_skipped(tmp_path: Path) -> None:
    samples = make_samples(20)
    members = [m for s in samples[:10] for m in sample_members(s)]
    members[3 * 4] = ("000004.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    write_raw_tar(tmp_path / "00000.tar", members)
    write_shards(samples[10:], tmp_path / "full", shard_size=10)
    full = (tmp_path / "full" / "00000.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(full[: len(full) // 2])

    stats = ReadStats()
    read = list(read_shards(str(tmp_path), stats))

    good_first = [s for s in samples[:10] if s.key != "000004"]
    assert as_records(read[:9]) == as_records(good_first)
    survivors = read[9:]
    assert 0 < len(survivors) < 10
    assert as_records(survivors) == as_records(samples[10 : 10 + len(survivors)])
    assert stats == ReadStats(
        samples=len(read), shards=2, skipped_images=1, skipped_truncated=1, truncated_shards=1
    )


def member_offsets(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


@pytest.mark.parametrize(
    "cut",
    [
        "half",
        "at_member_header",
        "inside_member_header",
        "inside_member_data",
        "before_end_of_archive",
    ],
)
def test_truncated_shard_detected_at_any_cut(tmp_path: Path, cut: str) -> None:
    samples = make_samples(10)
    write_shards(samples, tmp_path / "full", shard_size=10)
    full = (tmp_path / "full" / "00000.tar").read_bytes()
    members = member_offsets(tmp_path / "full" / "00000.tar")
    last = members[-1]
    cut_at = {
        "half": len(full) // 2,
        "at_member_header": members[12].offset,
        "inside_member_header": members[12].offset + 100,
        "inside_member_data": members[12].offset_data + 10,
        "before_end_of_archive": last.offset_data + -(-last.size // 512) * 512,
    }[cut]
    shard = tmp_path / "00000.tar"
    shard.write_bytes(full[:cut_at])

    stats = ReadStats()
    read = list(read_shard(str(shard), stats))

    # Only whole samples come out, in order; the possibly incomplete last one is dropped and
    # counted, so every sample that was started is accounted for.
    assert len(read) < 10
    assert as_records(read) == as_records(samples[: len(read)])
    assert stats.truncated_shards == 1 and stats.skipped_truncated == 1
    # member 12 starts sample 4: samples 0-3 are whole before it, the last of them unconfirmed
    delivered = {
        "at_member_header": 3,
        "inside_member_header": 3,
        "inside_member_data": 4,
        "before_end_of_archive": 9,
    }
    assert len(read) == delivered.get(cut, len(read))


def test_non_tar_file_counts_as_truncated(tmp_path: Path) -> None:
    (tmp_path / "00000.tar").write_bytes(b"not a tar at all" * 100)
    stats = ReadStats()
    assert list(read_shards(str(tmp_path), stats)) == []
    assert stats == ReadStats(shards=1, truncated_shards=1)


def test_malformed_members_are_counted_and_skipped(tmp_path: Path) -> None:
    image = png_bytes(make_samples(1)[0].image)
    write_raw_tar(
        tmp_path / "00000.tar",
        [
            ("000000.png", image),
            ("000000.txt", b"ok"),
            ("000000.json", b"{not json"),
            ("000001.png", image),
            ("000001.txt", b"\xff\xfe bad utf-8"),
            ("000001.json", b"{}"),
            ("000002.png", image),
            ("000002.json", b"[1, 2]"),  # JSON, but not an object
            ("README", b"no extension"),
            ("000003.txt", b"no image"),
            ("000003.json", b"{}"),
            ("000004.png", image),
            ("000004.cls", b"7"),  # unknown extension: ignored
        ],
    )
    stats = ReadStats()
    read = {s.key: s for s in read_shards(str(tmp_path), stats)}

    # 000001's alt-text is not UTF-8: the sample is skipped and counted, never kept blank
    assert list(read) == ["000000", "000002", "000004"]
    assert (read["000000"].text, read["000000"].meta) == ("ok", {})
    assert (read["000002"].text, read["000002"].meta) == ("", {})
    assert stats == ReadStats(samples=3, shards=1, skipped_members=5, skipped_captions=1)


def test_missing_local_paths_raise_naming_them(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        list(read_shards(str(missing)))
    with pytest.raises(FileNotFoundError, match="no_such_shard"):
        list(read_shard(str(tmp_path / "no_such_shard.tar"), ReadStats()))


def test_s3_prefix_reads_like_local_folder(
    tmp_path: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = make_samples(25)
    write_shards(samples, tmp_path, shard_size=10)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="shards")
    for path in sorted(tmp_path.iterdir()):
        s3.upload_file(str(path), "shards", f"toy/raw_pairs/{path.name}")
    s3.upload_file(str(tmp_path / "00000.tar"), "shards", "toy/raw_pairs_old/00000.tar")

    uri = "s3://shards/toy/raw_pairs"
    assert list_shards(uri, s3=s3) == [f"{uri}/0000{i}.tar" for i in range(3)]
    stats = ReadStats()
    assert as_records(list(read_shards(uri, stats, s3=s3))) == as_records(samples)
    assert stats == ReadStats(samples=25, shards=3)

    # Without a client, the default one follows AWS_ENDPOINT_URL.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert len(list(read_shards(uri))) == 25

    for missing in ["s3://shards/toy/nothing_here", "s3://no-such-bucket/toy"]:
        with pytest.raises(FileNotFoundError, match=missing):
            list_shards(missing, s3=s3)
    with pytest.raises(FileNotFoundError, match="gone.tar"):
        list(read_shard(f"{uri}/gone.tar", ReadStats(), s3=s3))


def test_s3_problems_name_the_uri_and_the_fix(
    s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = "s3://shards/toy"
    dead = boto3.client("s3", endpoint_url="http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(ConnectionError, match=f"cannot read {uri}: http://127.0.0.1:9 is unreach"):
        list_shards(uri, s3=dead)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    anonymous = boto3.session.Session().client("s3", endpoint_url=s3_server)
    with pytest.raises(PermissionError, match=f"cannot read {uri}: no credentials .*AWS_"):
        list_shards(uri, s3=anonymous)
