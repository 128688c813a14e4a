"""A trainer's checkpoints on S3, so a run that lost its node resumes on another one.

While the step trains, each new complete checkpoint (`ml.train` makes `step-N` appear by a
rename) is published under `<s3_uri>/checkpoints/<key>/<run>/step-N/` as an `s3_store`
version, then the object `NEWEST` names it: a reader never finds a half-uploaded one. A step
that finds no checkpoint of its run on local disk pulls the newest from S3 first.
"""

import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dalle3_dag import s3_store
from dalle3_dag.resources import StorageResource
from ml.train import CHECKPOINTS, checkpoint_steps

NEWEST = "NEWEST"  # the object naming the newest uploaded checkpoint of a run
POLL_S = 1.0


def _run_prefix(storage: StorageResource, key: str, work: Path) -> tuple[str, str]:
    bucket, prefix = storage.s3_location(f"{CHECKPOINTS}/{key}")
    return bucket, f"{prefix}/{work.name}"


def restore(storage: StorageResource, key: str, work: Path) -> int | None:
    """Pull the newest uploaded checkpoint of the run `work` when none is on local disk;
    returns its step, or None if there was nothing to pull."""
    if not storage.s3_uri or checkpoint_steps(work):
        return None
    client = storage.s3_client()
    bucket, prefix = _run_prefix(storage, key, work)
    name = s3_store.read_pointer(client, bucket, f"{prefix}/{NEWEST}")
    if name is None:
        return None
    final = work / CHECKPOINTS / name
    temp = final.with_name(f".{name}.pulling")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    s3_store.pull(client, bucket, f"{prefix}/{name}", temp)
    temp.rename(final)
    return int(name.removeprefix("step-"))


class _Uploader(threading.Thread):
    """Publishes the newest local checkpoint whenever a newer one appears."""

    def __init__(
        self, storage: StorageResource, key: str, work: Path, warn: Callable[[str], None]
    ) -> None:
        super().__init__(daemon=True, name=f"checkpoints-to-s3-{key}")
        self.storage, self.work, self.warn = storage, work, warn
        self.bucket, self.prefix = _run_prefix(storage, key, work)
        self.uploaded = max(checkpoint_steps(work), default=None)  # here already: from S3
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(POLL_S):
            self.sync()

    def sync(self) -> None:
        steps = checkpoint_steps(self.work)
        if not steps or steps[-1] == self.uploaded:
            return
        name = f"step-{steps[-1]}"
        try:
            client = self.storage.s3_client()
            s3_store.publish(
                client, self.work / CHECKPOINTS / name, self.bucket,
                f"{self.prefix}/{name}", self.storage.multipart_mb,
            )  # fmt: skip
            client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{NEWEST}", Body=name)
            self.uploaded = steps[-1]
        except FileNotFoundError:  # pruned by a newer one mid-upload: that one goes next
            pass
        except Exception as err:  # a lost upload costs recovery, never the training
            self.warn(f"checkpoint {name} not uploaded to s3://{self.bucket}/{self.prefix}: {err}")

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.sync()  # the last one, also when training failed: a retry elsewhere resumes there


@contextmanager
def mirrored(
    storage: StorageResource,
    key: str,
    work: Path | None,
    resume: bool,
    info: Callable[[str], None],
    warn: Callable[[str], None],
) -> Iterator[None]:
    """Restore the run's checkpoint from S3 if this node has none (when resuming), and upload
    new ones while the body runs; without `s3_uri` or a checkpoint folder, nothing."""
    if not storage.s3_uri or work is None:
        yield
        return
    if resume and (step := restore(storage, key, work)) is not None:
        info(f"{key}: pulled the checkpoint at step {step} from {storage.s3_uri}")
    uploader = _Uploader(storage, key, work, warn)
    uploader.start()
    try:
        yield
    finally:
        uploader.stop()
