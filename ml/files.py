"""The one way files are written (atomically), weights are checked before loading, and S3 URIs
are read, for `ml` and `dalle3_dag`."""

import csv
import io
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any


def temp_path(path: Path) -> Path:
    # Not ending in the file's own suffix (e.g. .tar), so listings never take it for a file;
    # fixed, so a rerun overwrites leftovers.
    return path.with_name(path.name + ".tmp")


def commit(file: IO[bytes], path: Path) -> None:
    """Flush `temp_path(path)`'s open file to disk and rename it into place."""
    file.flush()
    os.fsync(file.fileno())
    file.close()
    os.replace(temp_path(path), path)


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds `data` or what it held before, never a part."""
    with open(temp_path(path), "wb") as file:
        file.write(data)
        commit(file, path)


def replace_folder(new: Path, final: Path) -> None:
    """Make the complete folder `new` the folder `final`, in two renames: the old version is
    moved aside as `.<name>.old-<pid>-<random>` first (a writer killed between the renames
    leaves it there whole, for `dalle3_dag.resources.remove_orphans` to put back), then
    deleted."""
    old = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, value: Any) -> None:
    write_atomic(Path(path), (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    """Rows (dicts with the keys `fields`) as a CSV file with a header, even with no rows."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(Path(path), buffer.getvalue().encode())


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


class UnreadableFile(Exception):
    """A weights or state file that is truncated, corrupt or an unsafe pickle; names the file."""

    def __init__(self, path: Path, reason: object) -> None:
        super().__init__(f"{path} cannot be loaded: {reason}")
        self.path = path


def check_loadable(path: Path) -> None:
    """Raise `UnreadableFile` unless `path` loads safely: safetensors with a whole header and
    data, or a torch pickle that loads with `weights_only=True` (so a pickle that would run
    code is refused, as accelerate's own loader does). Other files are left to their readers."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as weights:
                weights.keys()
        elif path.suffix in (".bin", ".pkl", ".pt"):
            from accelerate.utils import load

            load(path, map_location="cpu")  # weights_only=True, accelerate's safe globals
    except Exception as err:  # safetensors, pickle and zip errors have no common base
        raise UnreadableFile(path, err) from err


def check_weights(folder: Path) -> Path:
    """`check_loadable` for every weights and state file under `folder`; returns `folder`.

    Libraries' own errors for a truncated file often do not say which file it was."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            check_loadable(path)
    return folder
