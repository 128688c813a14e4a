"""The bookkeeping every asset shares around its `ml` call: MLflow run, DVC hash, S3 mirror."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import mlflow

from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource

METRICS_FILE = "metrics.json"


@contextmanager
def tracked_run(
    context: dg.AssetExecutionContext, mlflow_tracker: MlflowResource, dvc: DvcResource
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run tagged with the DVC hashes of the asset's inputs, closed on exit."""
    tags = {}
    for key in context.assets_def.dependency_keys:
        name = key.to_user_string()
        if data_hash := dvc.out_hash(name):
            tags[f"dvc.input.{name}"] = data_hash
    with mlflow_tracker.start_run(context, tags) as run:
        yield run


def commit(
    key: str, storage: StorageResource, dvc: DvcResource, metadata: dict[str, Any]
) -> dg.MaterializeResult:
    """Version a finished asset folder with DVC, mirror it to S3 and build the result.

    The DVC hash becomes the Dagster data version and a tag of the active MLflow run.
    """
    data_hash = dvc.commit(key)
    mirror = storage.publish(key)
    metadata = {"path": dg.MetadataValue.path(str(storage.asset_dir(key))), **metadata}
    if run := mlflow.active_run():
        metadata["mlflow_run_id"] = run.info.run_id
        if data_hash:
            mlflow.set_tag("dvc.hash", data_hash)
    if data_hash:
        metadata["dvc_hash"] = data_hash
    if mirror:
        metadata["s3_uri"] = mirror
    version = dg.DataVersion(data_hash) if data_hash else None
    return dg.MaterializeResult(metadata=metadata, data_version=version)


def write_metrics(folder: Path, metrics: dict[str, float]) -> None:
    """Held-out metrics travel with the asset folder, where its checks read them."""
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))


def read_metrics(folder: Path) -> dict[str, float]:
    return json.loads((folder / METRICS_FILE).read_text())


def log_step(step: int, metrics: dict[str, float]) -> None:
    mlflow.log_metrics(metrics, step=step)
