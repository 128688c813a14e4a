"""Resources every asset shares: where outputs live, how runs are tracked, how data is versioned."""

import dataclasses
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import mlflow
import yaml

from dalle3_dag.project import PROJECT_DIR

# DVC exports this to the commands it runs; inside `dvc repro` the lock is DVC's to write.
DVC_REPRO_ENV = "DVC_STAGE"


class StorageResource(dg.ConfigurableResource):
    """The materialized store: one folder per asset key, mirrored to S3 when `s3_uri` is set.

    Outputs are written to a temporary sibling folder and swapped in only when complete, so a
    failed or killed materialization never leaves a half-written asset behind.
    """

    root: str = str(PROJECT_DIR / "assets")
    s3_uri: str | None = None
    endpoint_url: str | None = None

    def asset_dir(self, key: str) -> Path:
        return Path(self.root) / key

    @contextmanager
    def writing(self, key: str) -> Iterator[Path]:
        final = self.asset_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = final.parent / f".{key}.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url)

    def publish(self, key: str) -> str | None:
        """Mirror an asset folder to `s3_uri/<key>/`; returns the S3 prefix, or None if local."""
        if not self.s3_uri:
            return None
        bucket, _, prefix = self.s3_uri.removeprefix("s3://").partition("/")
        dest = f"{prefix.strip('/')}/{key}".lstrip("/")
        client = self.s3_client()
        src = self.asset_dir(key)
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{dest}/{path.relative_to(src).as_posix()}")
        return f"s3://{bucket}/{dest}"


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
    ) -> Iterator[mlflow.ActiveRun]:
        mlflow.set_tracking_uri(self.resolved_uri())
        if mlflow.get_experiment_by_name(self.experiment) is None:
            artifacts = (Path(self.project_dir) / "mlartifacts").resolve().as_uri()
            mlflow.create_experiment(self.experiment, artifact_location=artifacts)
        mlflow.set_experiment(self.experiment)
        key = context.asset_key.to_user_string()
        run_tags = {"dagster.run_id": context.run.run_id, "dagster.asset_key": key}
        if context.has_partition_key:
            run_tags["dagster.partition"] = context.partition_key
        run_tags.update(tags or {})
        name = f"{key}-{context.run.run_id[:8]}"
        with mlflow.start_run(run_name=name, tags=run_tags) as run:
            yield run

    @staticmethod
    def register(name: str, folder: Path) -> str:
        """Log a saved model folder to the active run and register it as a new model version.

        The folder is registered as it is (safetensors + JSON, loadable by our own one call);
        no pickled MLflow flavour is involved. Returns the version number.
        """
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

    def commit(self, stage: str) -> str | None:
        """Commit a stage's outputs; returns their hash (None inside `dvc repro`)."""
        if os.environ.get(DVC_REPRO_ENV):
            return None
        # Parallel materializations take turns on the repo lock instead of failing.
        self._dvc("--wait-for-lock", "commit", "--force", "--quiet", stage)
        return self.out_hash(stage)

    def out_hash(self, stage: str) -> str | None:
        """The recorded hash of a stage's first output, or None if it was never committed."""
        lock = Path(self.repo_dir) / "dvc.lock"
        if not lock.is_file():
            return None
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        outs = stages.get(stage, {}).get("outs", [])
        return outs[0].get("md5") if outs else None
