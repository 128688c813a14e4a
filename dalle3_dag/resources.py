"""Resources every asset shares: where outputs live, how runs are tracked, how data is versioned."""

import dataclasses
import fcntl
import io
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from ruamel.yaml import YAML

from dalle3_dag import s3_store
from dalle3_dag.project import DVC_REPRO_ENV, PROJECT_DIR
from ml.files import replace_folder, split_s3, write_atomic

REJECTED = ".rejected"


class StorageResource(dg.ConfigurableResource):
    """The materialized store: one folder per asset key, also kept on S3 when `s3_uri` is set
    (each version made live whole, see `s3_store`; a worker without a local copy pulls it).

    Outputs are written to a staging folder beside the live one and swapped in only when
    complete and audited (write-audit-publish): a failed, killed or rejected materialization
    never changes the live asset. Staging folders carry their writer's pid, so the next write
    removes those of dead writers; rejected versions are kept under `.rejected/` for a look.
    """

    root: str = str(PROJECT_DIR / "assets")
    s3_uri: str | None = None
    endpoint_url: str | None = None  # else boto3's own settings (AWS_ENDPOINT_URL_S3)
    multipart_mb: int = 8  # files above this size go up in parts of it

    def asset_dir(self, key: str) -> Path:
        return Path(self.root) / key

    def rejected_dir(self, key: str) -> Path:
        return Path(self.root) / REJECTED / key

    @contextmanager
    def writing(
        self, key: str, audit: Callable[[Path], str | None] | None = None
    ) -> Iterator[Path]:
        """A staging folder for a new version of `key`, made live on a clean exit.

        `audit(staged)` runs before the swap; a message back means the version is rejected: it
        moves to `rejected_dir(key)` and `Rejected` is raised with the message and the path.
        """
        final = self.asset_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(final.parent, key)
        tmp = final.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            problem = audit(tmp) if audit else None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if problem:
            kept = self.rejected_dir(key) / f"{time.strftime('%Y%m%d-%H%M%S')}-{tmp.name[-8:]}"
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(kept)
            raise Rejected(f"{key}: {problem}; the previous version stays live and the "
                           f"rejected one is kept at {kept}", kept)
        replace_folder(tmp, final)

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url)

    def s3_location(self, key: str) -> tuple[str, str]:
        """The bucket and prefix of `key` under `s3_uri`."""
        bucket, prefix = split_s3(self.s3_uri or "")
        return bucket, f"{prefix.strip('/')}/{key}".lstrip("/")

    def publish(self, key: str) -> str | None:
        """Upload the live folder of `key` to `s3_uri/<key>/` as its live version (see
        `s3_store`); returns the version's S3 URI, or None without `s3_uri`. Partitions of
        one asset publish one at a time, each with every partition finished so far."""
        if not self.s3_uri:
            return None
        bucket, prefix = self.s3_location(key)
        with _exclusive(Path(self.root) / ".locks" / f"{key}.publish"):
            return s3_store.publish(
                self.s3_client(), self.asset_dir(key), bucket, prefix, self.multipart_mb
            )

    def pull(self, key: str) -> bool:
        """Download the live S3 version of `key` when it is not here (a fresh worker); True
        if it did. Written through `writing`, so a failed download leaves nothing behind."""
        if not self.s3_uri or self.asset_dir(key).exists():
            return False
        bucket, prefix = self.s3_location(key)
        client = self.s3_client()
        if s3_store.live_version(client, bucket, prefix) is None:
            return False
        with self.writing(key) as staged:
            s3_store.pull(client, bucket, prefix, staged)
        return True


class Rejected(Exception):
    """A new version of an asset failed a blocking check and was not made live."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def run_owner_pid() -> int:
    """The process that owns this Dagster run: the run worker that spawned this step process
    (multiprocess executor), or this process itself (in-process execution)."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getpid()


def remove_orphans(parent: Path, key: str) -> list[Path]:
    """Remove the staging and swap folders of `key` whose writer process is gone.

    A writer killed between moving the live version aside and moving the new one in leaves
    no live folder: its swap folder is that live version, and is put back instead.
    """
    removed = []
    for path in sorted(parent.glob(f".{key}.*-*-*")):
        kind, _, owner = path.name.removeprefix(f".{key}.").partition("-")
        pid = owner.partition("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or pid_alive(int(pid)):
            continue
        if kind == "old" and not (parent / key).exists():
            path.rename(parent / key)
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class MlflowResource(dg.ConfigurableResource):
    """One MLflow run per materialization, tagged with its Dagster run, asset and partition.

    Ours rather than dagster-mlflow's, which leaves runs open across ops; here every run is
    closed, as FAILED when the asset raises.
    """

    tracking_uri: str | None = None
    experiment: str = "dalle3-dag"
    project_dir: str = str(PROJECT_DIR)

    def resolved_uri(self) -> str:
        default = f"sqlite:///{Path(self.project_dir) / 'mlflow.db'}"
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default

    @contextmanager
    def start_run(
        self, context: dg.AssetExecutionContext, tags: dict[str, str] | None = None
    ) -> Iterator[Any]:
        import mlflow

        uri = self.resolved_uri()
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(self.experiment) is None:
            # A local store keeps artifacts beside it; a server puts them where it was told
            # (`mlflow server --artifacts-destination s3://...`).
            server = uri.startswith(("http://", "https://", "databricks"))
            artifacts = (Path(self.project_dir) / "mlartifacts").resolve().as_uri()
            mlflow.create_experiment(self.experiment, None if server else artifacts)
        mlflow.set_experiment(self.experiment)
        key = context.asset_key.to_user_string()
        run_tags = {"dagster.run_id": context.run.run_id, "dagster.asset_key": key}
        if context.has_partition_key:
            run_tags["dagster.partition"] = context.partition_key
        run_tags.update(tags or {})
        run_tags |= {"process.pid": str(os.getpid()), "process.host": socket.gethostname()}
        self.close_dead_runs(key)
        name = f"{key}-{context.run.run_id[:8]}"
        with mlflow.start_run(run_name=name, tags=run_tags) as run:
            yield run

    def close_dead_runs(self, key: str) -> list[str]:
        """End as KILLED the RUNNING runs of `key` whose process on this host is gone."""
        import mlflow

        client = mlflow.MlflowClient()
        experiment = mlflow.get_experiment_by_name(self.experiment)
        running = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`dagster.asset_key` = '{key}' and attributes.status = 'RUNNING'",
        )
        closed = []
        for run in running:
            pid, host = run.data.tags.get("process.pid", ""), run.data.tags.get("process.host")
            if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                client.set_tag(run.info.run_id, "dalle3.closed", f"process {pid} was gone")
                client.set_terminated(run.info.run_id, status="KILLED")
                closed.append(run.info.run_id)
        return closed

    @staticmethod
    def register(name: str, folder: Path) -> str:
        """Log a saved model folder to the active run and register it as a new model version.

        The folder is registered as it is (safetensors + JSON, loadable by our own one call);
        no pickled MLflow flavour is involved. Returns the version number.
        """
        import mlflow

        mlflow.log_artifacts(str(folder), artifact_path=name)
        client = mlflow.MlflowClient()
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            client.create_registered_model(name)
        run = mlflow.active_run()
        source = f"{run.info.artifact_uri}/{name}"
        return client.create_model_version(name, source, run_id=run.info.run_id).version

    @staticmethod
    def log_config(cfg: Any) -> None:
        """Log a (nested) config dataclass as flat, dotted MLflow params."""
        import mlflow


        def flat(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
            if isinstance(value, dict):
                for k, v in value.items():
                    yield from flat(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                yield prefix, value

        mlflow.log_params(dict(flat("", dataclasses.asdict(cfg))))


class DvcResource(dg.ConfigurableResource):
    """Versions asset outputs with the DVC CLI: one stage per asset in dvc.yaml.

    After an asset is written, `dvc commit` of its stage records the output hash in dvc.lock;
    that hash is the asset's Dagster data version. Under `dvc repro` DVC records it itself.
    """

    repo_dir: str = str(PROJECT_DIR)

    def _dvc(self, *args: str) -> str:
        cmd = [sys.executable, "-m", "dvc", *args]
        proc = subprocess.run(cmd, cwd=self.repo_dir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"`dvc {' '.join(args)}` failed in {self.repo_dir}:\n{proc.stderr}")
        return proc.stdout

    def commit(self, stage: str, params: dict[str, Any] | None = None) -> str | None:
        """Commit a stage's outputs; returns their hash (None inside `dvc repro`).

        `params` ({section: values}) are the stage's parameters as they ran. DVC reads them
        from params.yaml, so dvc.lock is rewritten to hold the values that ran: after a run
        with overrides or another params file, `dvc status` reports the stage as changed.
        """
        if os.environ.get(DVC_REPRO_ENV):
            return None
        lock = Path(self.repo_dir) / "dvc.lock"
        # One commit (and lock rewrite) at a time: parallel partitions take turns.
        with _exclusive(Path(self.repo_dir) / ".dvc" / "tmp" / "dalle3-commit.lock"):
            self._dvc("--wait-for-lock", "commit", "--force", "--quiet", stage)
            if params:
                # YAML 1.2, as DVC writes it: PyYAML's 1.1 would read a "no" DVC left unquoted
                # as false and record a value that never ran
                lock_yaml = YAML()
                data = lock_yaml.load(lock.read_text())
                recorded = data["stages"][stage].setdefault("params", {})
                recorded.setdefault("params.yaml", {}).update(params)
                text = io.StringIO()
                lock_yaml.dump(data, text)
                write_atomic(lock, text.getvalue().encode())
        return self.out_hash(stage)

    def out_hash(self, stage: str) -> str | None:
        """The recorded hash of a stage's first output, or None if it was never committed."""
        lock = Path(self.repo_dir) / "dvc.lock"
        if not lock.is_file():
            return None
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        outs = stages.get(stage, {}).get("outs", [])
        return outs[0].get("md5") if outs else None
