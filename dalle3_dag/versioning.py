"""The bookkeeping every asset shares around its `ml` call: MLflow run, audit, DVC, S3 mirror.

A new version of an asset is written to a staging folder (with its effective config, see
`ml.stage.run_stage`), audited by the asset's checks there, and only then made live,
DVC-committed and mirrored (write-audit-publish): a blocking check that fails leaves the
previous version live.
"""

import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from dalle3_dag.resources import (
    DvcResource,
    MlflowResource,
    Rejected,
    StorageResource,
    pid_alive,
    run_owner_pid,
)

PID_TAG, HOST_TAG = "dalle3/pid", "dalle3/host"


@dataclass(frozen=True)
class FolderCheck:
    """An asset check that reads an asset folder: the staged version, before it goes live.

    Only a failure of ERROR severity from a blocking check rejects the version; a check that
    cannot measure on this data (e.g. no scene graphs) reports a WARN failure instead.
    """

    name: str
    evaluate: Callable[[Path], dg.AssetCheckResult]
    description: str
    blocking: bool = False

    def spec(self, key: str) -> dg.AssetCheckSpec:
        return dg.AssetCheckSpec(
            self.name, asset=key, description=self.description, blocking=self.blocking
        )


def folder_check(
    description: str, blocking: bool = False
) -> Callable[[Callable[[Path], dg.AssetCheckResult]], FolderCheck]:
    """Declare a `FolderCheck`, named after the function."""
    return lambda fn: FolderCheck(fn.__name__, fn, description, blocking)


def named(name: str, result: dg.AssetCheckResult) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=name, passed=result.passed, metadata=result.metadata, severity=result.severity
    )


def check_specs(key: str, checks: list[FolderCheck]) -> list[dg.AssetCheckSpec]:
    return [check.spec(key) for check in checks]


@dataclass
class Staged:
    """The staging folder of a new version and, once audited, its check results."""

    path: Path
    checks: list[dg.AssetCheckResult] = field(default_factory=list)


@contextmanager
def staged(
    context: dg.AssetExecutionContext,
    key: str,
    storage: StorageResource,
    checks: Sequence[FolderCheck] = (),
) -> Iterator[Staged]:
    """Write a new version of `key`: staged, audited by `checks`, made live only if they pass.

    A rejected version is reported as failed check evaluations and a `dg.Failure` naming the
    folder it was kept in; the MLflow run around it ends FAILED with that path as a tag.
    """
    import mlflow

    stage = Staged(Path())

    def audit(folder: Path) -> str | None:
        stage.checks = [named(check.name, check.evaluate(folder)) for check in checks]
        failed = [
            check.name
            for check, result in zip(checks, stage.checks, strict=True)
            if check.blocking and not result.passed
            and result.severity == dg.AssetCheckSeverity.ERROR
        ]
        return f"blocking check(s) failed: {', '.join(failed)}" if failed else None

    try:
        with storage.writing(key, audit) as folder:
            stage.path = folder
            yield stage
    except Rejected as err:
        for result in stage.checks:
            context.log_event(
                dg.AssetCheckEvaluation(
                    asset_key=dg.AssetKey(key),
                    check_name=result.check_name,
                    passed=result.passed,
                    metadata=result.metadata,
                    severity=result.severity,
                    blocking=any(c.blocking for c in checks if c.name == result.check_name),
                )
            )
        if mlflow.active_run():
            mlflow.set_tag("dalle3.rejected", str(err.path))
        raise dg.Failure(
            description=str(err), metadata={"rejected_path": dg.MetadataValue.path(str(err.path))}
        ) from err


def fail_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark this host's Dagster runs whose process died (SIGKILL, OOM) as failed, and free the
    pool slots they held: a killed trainer would otherwise keep the accelerator pool for good,
    and the next materialization would wait for it forever."""
    host, closed = socket.gethostname(), []
    started = instance.get_runs(
        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED], tags={HOST_TAG: host})
    )
    for run in started:
        pid = run.tags.get(PID_TAG, "")
        if pid.isdigit() and not pid_alive(int(pid)):
            instance.report_run_failed(run, f"its process {pid} on {host} is gone")
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
            closed.append(run.run_id)
    return closed


def close_dead_runs(context: dg.AssetExecutionContext) -> list[str]:
    """Tag this run with the process that owns it, then fail the runs whose process died."""
    tags = {PID_TAG: str(run_owner_pid()), HOST_TAG: socket.gethostname()}
    context.instance.add_run_tags(context.run_id, tags)
    return fail_dead_runs(context.instance)


@contextmanager
def tracked_run(
    context: dg.AssetExecutionContext, mlflow_tracker: MlflowResource, dvc: DvcResource
) -> Iterator[Any]:
    """An MLflow run tagged with the DVC hashes of the asset's inputs, closed on exit.

    First, runs of earlier materializations whose process died are closed as failed.
    """
    for run_id in close_dead_runs(context):
        context.log.warning(f"marked Dagster run {run_id} failed: its process is gone")
    tags = {}
    for key in context.assets_def.dependency_keys:
        name = key.to_user_string()
        if data_hash := dvc.out_hash(name):
            tags[f"dvc.input.{name}"] = data_hash
    with mlflow_tracker.start_run(context, tags) as run:
        yield run


def commit(
    key: str,
    storage: StorageResource,
    dvc: DvcResource,
    metadata: dict[str, Any],
    params: dict[str, Any] | None = None,
    checks: list[dg.AssetCheckResult] = (),
) -> dg.MaterializeResult:
    """Version a live asset folder with DVC, publish it to S3 and build the result.

    `params` are the params.yaml sections as they ran (overrides applied), which dvc.lock
    records. The DVC hash becomes the Dagster data version and a tag of the MLflow run.
    """
    import mlflow

    data_hash = dvc.commit(key, params)
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
    return dg.MaterializeResult(metadata=metadata, data_version=version, check_results=checks)
