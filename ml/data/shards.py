"""The project's one shard reader and writer: webdataset tars in img2dataset layout.

A shard `{n:05d}.tar` holds, per sample, consecutive members `{key}.png|jpg` (the image),
`{key}.txt` (alt-text, UTF-8) and `{key}.json` (metadata), next to an img2dataset-style
`{n:05d}_stats.json`. Plain `webdataset.WebDataset` and img2dataset tooling read these
folders unchanged.

Writing is atomic and byte-deterministic, because DVC versions the folders by hash and
`dvc repro` must reproduce that hash. Reading streams (a local file or an S3 object body,
never a whole shard on disk) and survives bad data: corrupt images, malformed members and
cut-off shards are counted in `ReadStats` and skipped, never fatal, since one bad record in
a web-scale crawl must not stop a pipeline stage.
"""

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from PIL import Image

from ml.data.sample import Sample
from ml.files import commit, split_s3, temp_path, write_atomic

IMAGE_FORMATS = ("png", "jpg")  # what the writer encodes
# Extensions the reader decodes as images, in order of preference; img2dataset writes these.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
JPEG_QUALITY = 95  # img2dataset's default encode quality


class ShardWriter:
    """Writes samples into numbered tar shards of `shard_size` samples each.

    Each shard goes to `{name}.tmp` in `out_dir` and is renamed to its final name only once
    complete, so a killed writer never leaves a half shard that readers would pick up. Leaving
    the `with` block on an exception discards the open shard the same way; finished shards
    stay. Shards from an earlier run into the same folder are overwritten but not removed.
    """

    def __init__(self, out_dir: Path, shard_size: int, image_format: str = "png") -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.image_format = image_format
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._names: list[str] = []
        self._file: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0  # samples in the open shard

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard_shard()

    def write(self, sample: Sample) -> None:
        """Appends one sample, starting a new shard when the current one is full."""
        _check_key(sample.key)
        # Encode everything before touching the tar so a failure cannot leave half a sample.
        members = [
            (f"{sample.key}.{self.image_format}", _encode_image(sample.image, self.image_format)),
            (f"{sample.key}.txt", sample.text.encode("utf-8")),
            (f"{sample.key}.json", _encode_json(sample.meta)),
        ]
        tar = self._tar if self._tar is not None else self._open_shard()
        for name, data in members:
            tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
        self._count += 1
        if self._count == self.shard_size:
            self._finish_shard()

    def close(self) -> list[str]:
        """Finishes the open shard and returns the names of all shards written, in order."""
        if self._tar is not None:
            self._finish_shard()
        return list(self._names)

    def _shard_path(self) -> Path:
        return self.out_dir / f"{len(self._names):05d}.tar"

    def _open_shard(self) -> tarfile.TarFile:
        # Both stay open across write() calls; _finish_shard or _discard_shard closes them.
        self._file = open(temp_path(self._shard_path()), "wb")  # noqa: SIM115
        # PAX is pinned so the bytes do not depend on the Python version's default format.
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._count = 0
        return self._tar

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None
        path = self._shard_path()
        self._tar.close()  # writes the end-of-archive blocks; leaves the file open
        commit(self._file, path)
        stats = {
            "count": self._count,
            "successes": self._count,
            "failed_to_download": 0,
            "failed_to_resize": 0,
        }
        write_atomic(
            path.with_name(f"{path.stem}_stats.json"),
            json.dumps(stats, indent=4, sort_keys=True).encode() + b"\n",
        )
        self._names.append(path.name)
        self._tar = self._file = None

    def _discard_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            temp_path(self._shard_path()).unlink()
        self._tar = self._file = None


def write_shards(
    samples: Iterable[Sample], out_dir: Path, shard_size: int, image_format: str = "png"
) -> list[str]:
    """Writes all samples to shards in `out_dir` and returns the shard names."""
    with ShardWriter(out_dir, shard_size, image_format) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.close()


def _check_key(key: str) -> None:
    # webdataset splits member names at the first dot and treats slashes as folders,
    # so such a key would not survive the round trip.
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key must be non-empty without '.' or '/': {key!r}")


def _encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        # Fixed zlib level and no optimize pass: the same pixels give the same bytes.
        image.save(buffer, format="PNG", compress_level=6)
    else:
        rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
        rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _encode_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A header with every machine- and time-dependent field fixed, for reproducible tars."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


@dataclass
class ReadStats:
    """What a read delivered and what it had to skip, to report per materialization."""

    samples: int = 0
    shards: int = 0
    skipped_images: int = 0  # samples dropped because their image bytes would not decode
    # Members dropped: no extension, JSON not parseable, or a key with no image.
    skipped_members: int = 0
    skipped_captions: int = 0  # samples dropped because their alt-text is not UTF-8
    # Samples dropped because their shard ended while reading them: the last one read from a
    # truncated shard may lack members, so it is never delivered.
    skipped_truncated: int = 0
    # Shards that end early (cut mid-member, mid-header or before the end-of-archive blocks)
    # or are not tars at all.
    truncated_shards: int = 0


def list_shards(uri: str, s3: Any = None) -> list[str]:
    """The `.tar` shards directly in a local folder or under an `s3://bucket/prefix`, sorted.

    With `s3=None` a default boto3 client is made, which honours AWS_ENDPOINT_URL.
    """
    return [entry["uri"] for entry in shard_listing(uri, s3)]


def shard_listing(uri: str, s3: Any = None) -> list[dict[str, Any]]:
    """Each shard's URI with its size and its modification time (local) or ETag (S3): a
    fingerprint of the source that changes when shards are added, removed or rewritten."""
    if uri.startswith("s3://"):
        return _list_s3(uri, s3 or boto3.client("s3"))
    folder = Path(uri)
    if not folder.is_dir():
        raise FileNotFoundError(f"shard folder not found: {uri}")
    paths = sorted(path for path in folder.glob("*.tar") if path.is_file())
    return [
        {"uri": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        for path, stat in ((path, path.stat()) for path in paths)
    ]


def read_shards(uri: str, stats: ReadStats | None = None, s3: Any = None) -> Iterator[Sample]:
    """Streams the samples of every shard in a folder or S3 prefix, in shard order."""
    stats = stats if stats is not None else ReadStats()
    if uri.startswith("s3://") and s3 is None:
        s3 = boto3.client("s3")
    for shard in list_shards(uri, s3):
        yield from read_shard(shard, stats, s3)


def read_shard(uri: str, stats: ReadStats, s3: Any = None) -> Iterator[Sample]:
    """Streams the samples of one shard (local path or `s3://bucket/key`), counting in `stats`."""
    with closing(_open_stream(uri, s3)) as stream:
        stats.shards += 1
        try:
            for key, parts in _member_groups(stream, stats):
                sample = _decode_sample(key, parts, stats)
                if sample is not None:
                    stats.samples += 1
                    yield sample
        except _Truncated as cut:
            stats.truncated_shards += 1
            stats.skipped_truncated += cut.pending


class _Truncated(Exception):
    """A shard ended early; `pending` samples were being read and are not delivered."""

    def __init__(self, pending: int) -> None:
        super().__init__("shard ends before its end-of-archive marker")
        self.pending = pending


@contextmanager
def _s3_errors(uri: str, s3: Any) -> Iterator[None]:
    """botocore's errors as ones that name the URI and say what to fix."""
    endpoint = getattr(getattr(s3, "meta", None), "endpoint_url", "the S3 endpoint")
    try:
        yield
    except NoCredentialsError as error:
        raise PermissionError(
            f"cannot read {uri}: no credentials (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        ) from error
    except EndpointConnectionError as error:
        raise ConnectionError(
            f"cannot read {uri}: {endpoint} is unreachable (check AWS_ENDPOINT_URL or the "
            "storage resource's endpoint_url)"
        ) from error
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "NoSuchKey", "404"):
            raise FileNotFoundError(f"not found: {uri}") from error
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PermissionError(f"cannot read {uri}: access denied ({code})") from error
        raise


def _list_s3(uri: str, s3: Any) -> list[dict[str, Any]]:
    bucket, prefix = split_s3(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # "data/a" must not match "data/ab/..."
    entries: list[dict[str, Any]] = []
    found_any = False
    with _s3_errors(uri, s3):
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, Delimiter="/"
        )
        for page in pages:
            found_any = found_any or page.get("KeyCount", 0) > 0
            entries += [
                {"uri": f"s3://{bucket}/{obj['Key']}", "size": obj["Size"], "etag": obj["ETag"]}
                for obj in page.get("Contents", [])
                if obj["Key"].endswith(".tar")
            ]
    if not found_any:  # S3 has no folders: an empty prefix is the closest thing to a missing one
        raise FileNotFoundError(f"shard prefix not found: {uri}")
    return sorted(entries, key=lambda entry: entry["uri"])


def _open_stream(uri: str, s3: Any) -> IO[bytes]:
    if not uri.startswith("s3://"):
        return open(uri, "rb")
    bucket, key = split_s3(uri)
    s3 = s3 or boto3.client("s3")
    with _s3_errors(uri, s3):
        return s3.get_object(Bucket=bucket, Key=key)["Body"]


class _ShardTarInfo(tarfile.TarInfo):
    """Marks the archive complete when tarfile reads its end-of-archive block.

    tarfile ends iteration silently on a missing, partial or garbled header after the first
    member, so without this a shard cut at a member boundary would pass as whole.
    """

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            archive.complete = True  # type: ignore[attr-defined]
            raise


class _ShardTarFile(tarfile.TarFile):
    tarinfo = _ShardTarInfo
    complete = False


def _member_groups(stream: IO[bytes], stats: ReadStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yields (key, {extension: bytes}) per run of consecutive members sharing a key.

    Raises `_Truncated` when the shard ends early; the group being read is then not yielded,
    as it may be missing members, and is counted as pending.
    """
    key, parts, reading = "", {}, False
    try:
        with _ShardTarFile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, dot, extension = os.path.basename(member.name).partition(".")
                if not dot:
                    stats.skipped_members += 1
                    continue
                if member_key != key and parts:
                    yield key, parts
                    parts = {}
                key, reading = member_key, True
                parts[extension.lower()] = tar.extractfile(member).read()  # type: ignore[union-attr]
                reading = False
            complete = tar.complete
    except (tarfile.TarError, EOFError) as error:  # EOFError: a compressed shard cut short
        raise _Truncated(int(bool(parts) or reading)) from error
    if not complete:
        raise _Truncated(int(bool(parts)))
    if parts:
        yield key, parts


def _decode_sample(key: str, parts: dict[str, bytes], stats: ReadStats) -> Sample | None:
    image_bytes = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
    if image_bytes is None:
        stats.skipped_members += len(parts)
        return None
    try:
        text = parts["txt"].decode("utf-8") if "txt" in parts else ""
    except UnicodeDecodeError:
        stats.skipped_captions += 1
        return None
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()  # decode now: PIL is lazy and would fail later, far from the shard
            rgb = image.convert("RGB")
    except Exception:  # decoders raise OSError, SyntaxError, ValueError... on bad bytes
        stats.skipped_images += 1
        return None
    return Sample(key=key, image=rgb, text=text, meta=_decode_meta(parts, stats))


def _decode_meta(parts: dict[str, bytes], stats: ReadStats) -> dict[str, Any]:
    try:
        meta = json.loads(parts["json"]) if "json" in parts else {}
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        stats.skipped_members += 1
        return {}
    if not isinstance(meta, dict):
        stats.skipped_members += 1
        return {}
    return meta


def shard_keys(uri: str, s3: Any = None) -> list[str]:
    """Keys of the samples in a shard that carry an image, in order, without decoding images.

    This is what `read_shard` would yield, plus the samples whose image bytes do not decode
    (which it counts in `ReadStats.skipped_images`) or whose alt-text is not UTF-8. It still
    reads the shard's bytes, since a streamed tar has no index, but skips the image decoding
    that dominates a read.
    """
    keys: list[str] = []
    with closing(_open_stream(uri, s3)) as stream:
        try:
            for key, parts in _member_groups(stream, ReadStats()):
                if any(ext in parts for ext in IMAGE_EXTENSIONS):
                    keys.append(key)
        except _Truncated:  # a cut-off shard: read_shard stops here too
            pass
    return keys
