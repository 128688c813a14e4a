"""Asset folders on S3: each version uploaded whole under `<prefix>/versions/<id>/`, then made
live by rewriting one small pointer object, so a reader never sees a version being written.

A version's files go up first (boto3's multipart uploads above a size: an unfinished one is
no object at all), then its manifest (every file's size and sha256), then the pointer. A
reader takes the pointer, then the manifest, and checks every file it downloads against it.
Old versions stay, as DVC keeps old data; a bucket lifecycle rule prunes them and aborts
multipart uploads a lost connection left unfinished.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

LIVE = "LIVE"  # the object holding the id of the live version
MANIFEST = "manifest.json"  # in each version, written after its files
PARTIAL_SUFFIX = ".tmp"  # ml.files.temp_path: a file still being written, never published


def _entry(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def manifest_of(folder: Path) -> dict[str, Any]:
    """Every complete file under `folder`: its size and sha256, by relative POSIX path."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        "files": {
            p.relative_to(folder).as_posix(): _entry(p)
            for p in paths
            if not p.name.endswith(PARTIAL_SUFFIX)
        }
    }


def version_id(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _exists(client: Any, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def publish(client: Any, folder: Path, bucket: str, prefix: str, part_mb: int) -> str:
    """Upload `folder` as a new version and make it live; returns the version's s3:// URI.

    The same contents published again upload nothing: their version exists already.
    """
    from boto3.s3.transfer import TransferConfig

    transfer = TransferConfig(multipart_threshold=part_mb << 20, multipart_chunksize=part_mb << 20)
    manifest = manifest_of(folder)
    version = version_id(manifest)
    base = f"{prefix}/versions/{version}"
    if not _exists(client, bucket, f"{base}/{MANIFEST}"):
        for rel in manifest["files"]:
            client.upload_file(str(folder / rel), bucket, f"{base}/{rel}", Config=transfer)
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        client.put_object(Bucket=bucket, Key=f"{base}/{MANIFEST}", Body=body)
    client.put_object(Bucket=bucket, Key=f"{prefix}/{LIVE}", Body=version.encode())
    return f"s3://{bucket}/{base}"


def read_pointer(client: Any, bucket: str, key: str) -> str | None:
    """The text of the small pointer object `key` (`LIVE` and the like), or None if absent."""
    if not _exists(client, bucket, key):
        return None
    return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def live_version(client: Any, bucket: str, prefix: str) -> str | None:
    """The id of the live version under `prefix`, or None if nothing was published there."""
    return read_pointer(client, bucket, f"{prefix}/{LIVE}")


def pull(client: Any, bucket: str, prefix: str, dest: Path) -> str:
    """Download the live version under `prefix` into the empty folder `dest`; returns its id.

    A file whose size or sha256 differs from the manifest is an error naming its object.
    """
    version = live_version(client, bucket, prefix)
    if version is None:
        raise FileNotFoundError(f"nothing is published at s3://{bucket}/{prefix}")
    base = f"{prefix}/versions/{version}"
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{base}/{MANIFEST}")["Body"].read())
    for rel, expected in manifest["files"].items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, f"{base}/{rel}", str(path))
        if _entry(path) != expected:
            raise ValueError(f"s3://{bucket}/{base}/{rel} does not match its manifest")
    return version

