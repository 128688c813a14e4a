"""The one asset factory: every stage of `ml.stages` becomes a Dagster asset the same way.

The bookkeeping is done once here: resolve the config (params.yaml section, run config laid
over it) -> tracked MLflow run -> staged write -> the `ml` stage -> metrics, images, registry
-> DVC commit -> metadata. The run-config class of each asset is generated from its stage's
config dataclass (every field optional, nested sections nested), so every field of params.yaml
can be overridden from the launchpad and no config is written twice.
"""

import dataclasses
import hashlib
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from pydantic import create_model

from dalle3_dag.automation import RETRAIN
from dalle3_dag.checkpoint_mirror import mirrored
from dalle3_dag.imports import closure, module_file, project_imports
from dalle3_dag.launch import LAUNCH, LaunchConfig, launched
from dalle3_dag.metadata import captioned_images, markdown_image, markdown_table
from dalle3_dag.progress import ProgressLog
from dalle3_dag.project import ACCELERATOR_POOL, PROJECT_DIR, effective_params, resolve
from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource
from dalle3_dag.retries import retried_if_transient
from dalle3_dag.versioning import FolderCheck, check_specs, commit, staged, tracked_run
from ml.files import write_csv, write_json
from ml.stage import Inputs, Stage, StageResult, run_stage

CHECKPOINTS = ".checkpoints"
KINDS = {"pytorch", "mlflow", "dvc"}
ASSETS = "assets"
METRICS_DIR = "metrics"  # DVC metrics files, tracked by git
PLOTS_DIR = "plots"  # DVC plots files (`plots/<key>/<name>.csv`), tracked by git
LOSS_PLOT = {"x": "step", "y": "loss"}  # every trainer's curve (`TrainResult.curve`)
# What dvc.yaml says of each asset the factory built (see `dvc_stages`), by asset key.
DVC_STAGES: dict[str, dict[str, Any]] = {}


def _field_type(hint: Any, name: str) -> Any:
    """The run-config type of a dataclass field: nested dataclasses become nested classes,
    tuples lists, unions Any; the rest is as Dagster's config system takes it."""
    if dataclasses.is_dataclass(hint):
        return config_class(hint, name)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return list[args[0]]
    if origin in (typing.Union, types.UnionType):
        # Dagster's config types have no union of scalars and lists; `build_config` still
        # checks the value against the real annotation, naming the field.
        return Any
    return hint


def config_class(cls: type, name: str) -> type[dg.Config]:
    """A Dagster run-config class with every field of the dataclass `cls`, each optional:
    unset fields keep params.yaml's values."""
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: (_field_type(hints[f.name], f"{name}_{f.name}") | None, None)
        for f in dataclasses.fields(cls)
    }
    return create_model(name, __base__=dg.Config, **fields)


def code_files(stage: Stage, module: str) -> list[str]:
    """The project files an asset's code is made of: its stage's import closure, and its asset
    module's, less the other stages that module also defines assets for."""
    own = module_file(module, PROJECT_DIR)
    stages = f"{stage.module.rpartition('.')[0]}."
    imported = {
        name
        for name in project_imports(own, PROJECT_DIR)
        if not name.startswith(stages) or name == stage.module
    }
    files = closure(sorted(imported | {stage.module}), PROJECT_DIR)
    return sorted({*files, own.relative_to(PROJECT_DIR).as_posix()})


def _code_version(files: list[str], sections: list[str]) -> str:
    """A hash of every project file the stage's code and its asset's module import, and of the
    params sections it runs with, so an edit to any of them shows the asset as changed code
    in the UI and `dalle3 run` reruns it."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.encode() + (PROJECT_DIR / path).read_bytes())
    for section in sections:
        values = yaml.safe_dump(effective_params(section), sort_keys=True)
        digest.update(section.encode() + values.encode())
    return digest.hexdigest()[:12]


def _metadata_value(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return dg.MetadataValue.int(value)
    if isinstance(value, float):
        return dg.MetadataValue.float(round(value, 4))
    return dg.MetadataValue.json(value)


def stage_asset(
    stage: Stage,
    *,
    module: str,
    group: str,
    description: str,
    kinds: set[str] = frozenset(),
    checks: Sequence[FolderCheck] = (),
    deps: Sequence[str] = (),
    params: Sequence[str] = (),
    partitions_def: dg.PartitionsDefinition | None = None,
    after: Callable[[dg.AssetExecutionContext, StageResult], None] | None = None,
    dvc_metrics: bool = False,
    plots: Mapping[str, Mapping[str, str]] | None = None,
    automation: dg.AutomationCondition | None = None,
    on_demand: bool = False,
    backfill_policy: dg.BackfillPolicy | None = None,
    input_partitions: Mapping[str, dg.PartitionMapping] | None = None,
) -> dg.AssetsDefinition:
    """The asset of `stage`: its key, input assets (plus `deps`), group, checks and code
    version, and the one materialization body.

    `params` are other params.yaml sections the asset's result depends on (check floors);
    dvc.lock records them with the stage's own. A partitioned stage writes its partitions'
    files into the live folder itself (each one atomically) and runs all the partitions of a
    run in one step. `after` adds the few Dagster-only lines an asset needs (e.g. syncing
    partitions). With `dvc_metrics` the held-out metrics are also written to
    `metrics/<key>.json`, which dvc.yaml lists as the stage's metrics (`dvc metrics show`).
    `plots` (name -> DVC plot properties: x, y, template) are the stage's `curves`, written
    to `plots/<key>/<name>.csv` and listed as its plots (`dvc plots show`); a name ending in
    `.png` is the stage's image of that name instead. A trainer also has its loss curve, but
    for a partitioned one, whose partitions each have their own (in their MLflow runs).
    `automation` is when the asset rebuilds on its own: a trainer's default is the weekly
    retrain (`dalle3_dag.automation`); an `on_demand` asset (an experiment) never does. A
    partitioned asset's backfill runs as one run unless `backfill_policy` says otherwise.
    `input_partitions` maps an input to the partitions of it each partition reads, where the
    two are partitioned differently.
    """
    key = stage.name
    code = code_files(stage, module)
    DVC_STAGES[key] = {
        "cmd": (
            f"dalle3 run --select {key}"  # every partition, through the Dagster CLI
            if partitions_def
            else f"dagster asset materialize -m dalle3_dag.definitions --select {key}"
        ),
        "deps": [f"{ASSETS}/{name}" for name in stage.inputs] + code,
        "params": [key, *params],
        "outs": [f"{ASSETS}/{key}"],
    }
    if dvc_metrics:  # outside the out folder, which DVC would not let a metric overlap
        DVC_STAGES[key]["metrics"] = [{f"{METRICS_DIR}/{key}.json": {"cache": False}}]
    loss = {"loss": LOSS_PLOT} if stage.trains and not partitions_def else {}
    plots = {**loss, **(plots or {})}
    if plots:
        DVC_STAGES[key]["plots"] = [
            {f"{PLOTS_DIR}/{key}/{plot_file(name)}": {"cache": False, **props}}
            for name, props in plots.items()
        ]
    fields: dict[str, Any] = {}
    if stage.trains:
        fields["resume"] = (bool, True)  # how to run, not what: no part of the config
    overrides_class = create_model(
        f"{key}_config", __base__=config_class(stage.config, f"{key}_params"), **fields
    )

    def materialize(
        context: dg.AssetExecutionContext,
        config: overrides_class,  # type: ignore[valid-type]
        storage: StorageResource,
        mlflow_tracker: MlflowResource,
        dvc: DvcResource,
    ) -> dg.MaterializeResult:
        import mlflow

        overrides = config.model_dump()
        resume = overrides.pop("resume", True)
        cfg, values = resolve(stage.config, key, overrides)
        inputs = Inputs(
            folders={name: storage.asset_dir(name) for name in stage.inputs},
            versions={name: dvc.out_hash(name) or "unversioned" for name in stage.inputs},
            work=Path(storage.root) / CHECKPOINTS / key,
            resume=resume,
            partitions=list(context.partition_keys) if partitions_def else [],
            s3=storage.s3_client,
        )
        for name in stage.inputs:  # a missing input is named before any work
            if storage.pull(name):
                context.log.info(f"{name}: pulled its live version from {storage.s3_uri}")
            inputs[name]
        started = time.monotonic()
        context.log.info(f"{key}: started")
        with tracked_run(context, mlflow_tracker, dvc) as run:
            mlflow_tracker.log_config(cfg)
            log = ProgressLog(context.log.info, key, run.info.run_id)
            launch = resolve(LaunchConfig, LAUNCH)[0] if stage.trains else LaunchConfig()
            work = inputs.checkpoints(cfg) if stage.trains else None
            if partitions_def:
                checked: list[dg.AssetCheckResult] = []
                result = run_stage(stage, cfg, inputs, storage.asset_dir(key), log)
            else:
                with (
                    staged(context, key, storage, checks) as version,
                    mirrored(storage, key, work, resume, context.log.info, context.log.warning),
                ):
                    if launch.processes > 1:
                        result = launched(context, stage, cfg, inputs, version.path, launch)
                    else:
                        result = run_stage(stage, cfg, inputs, version.path, log)
                checked = version.checks
            if dvc_metrics:
                metrics_path = Path(dvc.repo_dir) / METRICS_DIR / f"{key}.json"
                metrics_path.parent.mkdir(exist_ok=True)
                write_json(metrics_path, result.metrics)
            for name, props in plots.items():
                write_plot(Path(dvc.repo_dir) / PLOTS_DIR / key, name, props, result)
            mlflow.log_metrics(result.metrics | result.speed)
            for name, image in result.images.items():
                mlflow.log_image(image, f"{name}.png")
            for name, document in result.files.items():
                mlflow.log_dict(document, name)
            metadata = {name: _metadata_value(v) for name, v in result.metadata.items()}
            figures = result.metrics | result.speed
            metadata |= {name: _metadata_value(v) for name, v in figures.items()}
            if result.examples:
                metadata["examples"] = captioned_images(result.examples)
            metadata |= {name: markdown_table(rows) for name, rows in result.tables.items()}
            metadata |= {name: markdown_image(image) for name, image in result.images.items()}
            if result.register:
                metadata["registered_version"] = mlflow_tracker.register(
                    key, storage.asset_dir(key)
                )
            if after is not None:
                after(context, result)
            recorded = {key: values, **{section: effective_params(section) for section in params}}
            materialized = commit(key, storage, dvc, metadata, recorded, checked)
        figures = ", ".join(f"{k} {v:.4g}" for k, v in list(result.metrics.items())[:8])
        failed = [c.check_name for c in checked if not c.passed]
        log.info(
            f"{key}: done in {time.monotonic() - started:.0f} s; {figures}"
            + (f"; checks failed: {', '.join(failed)}" if failed else "")
        )
        return materialized


    @dg.asset(
        key=key,
        deps=[
            dg.AssetDep(name, partition_mapping=(input_partitions or {})[name])
            if name in (input_partitions or {})
            else name
            for name in (*stage.inputs, *deps)
        ],
        group_name=group,
        kinds={*KINDS, *kinds},
        pool=ACCELERATOR_POOL if stage.trains else None,
        automation_condition=None
        if on_demand
        else automation or (RETRAIN if stage.trains else None),
        code_version=_code_version(code, [key, *params]),
        check_specs=check_specs(key, list(checks)),
        partitions_def=partitions_def,
        backfill_policy=backfill_policy
        or (dg.BackfillPolicy.single_run() if partitions_def else None),
        description=description,
    )
    def _asset(
        context: dg.AssetExecutionContext,
        config: overrides_class,  # type: ignore[valid-type]
        storage: StorageResource,
        mlflow_tracker: MlflowResource,
        dvc: DvcResource,
    ) -> dg.MaterializeResult:
        with retried_if_transient(context):
            return materialize(context, config, storage, mlflow_tracker, dvc)

    return _asset


def plot_file(name: str) -> str:
    """The file of a declared plot: the image itself, or the curve's rows as CSV."""
    return name if name.endswith(".png") else f"{name}.csv"


def write_plot(
    folder: Path, name: str, props: Mapping[str, str], result: StageResult
) -> None:
    """A declared plot's image, or its rows as CSV; a stage that made no curve (a pretrained
    model) writes the header alone, so the file DVC tracks always exists."""
    folder.mkdir(parents=True, exist_ok=True)
    if name.endswith(".png"):
        result.images[name.removesuffix(".png")].save(folder / name)
        return
    if name not in result.curves:
        raise KeyError(f"the stage returned no curve {name!r} for its DVC plot")
    rows = result.curves[name]
    write_csv(folder / f"{name}.csv", rows, list(rows[0]) if rows else [props["x"], props["y"]])


def dvc_yaml(order: Sequence[str]) -> str:
    """dvc.yaml as the assets define it: one stage per asset, in `order` (the definitions'
    stages, so the file does not depend on which module was imported first), its code
    dependencies the import closure of its stage and asset modules (`dalle3 dvc-yaml`)."""
    header = (
        "# Generated by `dalle3 dvc-yaml` from the asset definitions; edit those, not this.\n"
        "# One stage per Dagster asset. Each command materializes its asset with the Dagster\n"
        "# CLI; when Dagster materializes an asset itself, it runs `dvc commit <stage>` and\n"
        "# records the parameters as they ran, so dvc.lock always holds the hash of every asset.\n"
    )
    stages = {name: DVC_STAGES[name] for name in order}
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False)
