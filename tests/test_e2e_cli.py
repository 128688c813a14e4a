"""End to end through the real CLIs: Dagster materializes, DVC versions and pushes to S3."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import mlflow
import pytest
import yaml
from conftest import make_project

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def run(cmd: list[str], project, **env: str) -> str:
    full_env = {**project.env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    proc = subprocess.run(cmd, cwd=project.root, env=full_env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def cli_instance(project) -> dg.DagsterInstance:
    """The Dagster instance the CLI runs wrote to, opened without touching this process's env."""
    return dg.DagsterInstance.from_config(str(project.root / ".dagster"))


def test_cli_materialize_versions_tracks_and_reproduces(project, s3_server):
    run([str(BIN / "dagster"), "asset", "materialize", "-m", "dalle3_dag.definitions",
         "--select", "raw_pairs"], project)
    data_hash = project.dvc.out_hash("raw_pairs")
    assert data_hash

    # DVC agrees the stage is not stale, and the hash is the Dagster data version
    status = run([sys.executable, "-m", "dvc", "status", "raw_pairs"], project)
    assert "up to date" in status, status
    with cli_instance(project) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("raw_pairs"))
        materialization = event.asset_materialization
        assert materialization.tags["dagster/data_version"] == data_hash
        run_id = materialization.metadata["mlflow_run_id"].value
    mlflow.set_tracking_uri(project.mlflow.resolved_uri())
    assert mlflow.get_run(run_id).info.status == "FINISHED"

    # `dvc repro` runs the stage's own Dagster command and lands on the same hash
    run([sys.executable, "-m", "dvc", "repro", "--force", "raw_pairs"], project)
    assert project.dvc.out_hash("raw_pairs") == data_hash

    # and the versioned data goes to an S3 remote
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="dvc")
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "remote", "add", "-d", "s3", "s3://dvc/store"], project)
    run([*dvc, "remote", "modify", "s3", "endpointurl", s3_server], project)
    run([*dvc, "push"], project)
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="dvc")
    assert listed["KeyCount"] > 1


def step_spans(instance: dg.DagsterInstance, run_id: str) -> dict[str, tuple[float, float]]:
    """(start, end) of each step of a run."""
    events = instance.all_logs(
        run_id, of_type={dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}
    )
    spans: dict[str, list[float]] = {}
    for event in events:
        spans.setdefault(event.step_key, []).append(event.timestamp)
    return {step: (start, end) for step, (start, end) in spans.items()}


def test_training_steps_take_turns_in_the_accelerator_pool(project, tmp_path):
    """Two runs launched together, one training captioner_ssc and one captioner_dsc, never
    train at once (the pool of dagster.yaml holds across runs), while a data step of a third
    run on the same instance (another project's raw_pairs) goes on beside them."""
    materialize = [str(BIN / "dagster"), "asset", "materialize", "-m", "dalle3_dag.definitions"]
    select = "key:raw_pairs or key:clip_encoder or key:captioner_base"
    run([*materialize, "--select", select], project)
    other = make_project(tmp_path / "other")
    params = yaml.safe_load((other.root / "params.yaml").read_text())
    params["raw_pairs"]["splits"]["train"] = 12000
    (other.root / "params.yaml").write_text(yaml.safe_dump(params))
    beside = {**other.env(), "DAGSTER_HOME": str(project.root / ".dagster")}
    path = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    launched = [
        subprocess.Popen([*materialize, "--select", key], cwd=root, env={**env, "PATH": path},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for key, root, env in (
            ("captioner_ssc", project.root, project.env()),
            ("captioner_dsc", project.root, project.env()),
            ("raw_pairs", other.root, beside),
        )
    ]
    assert [proc.wait(timeout=600) for proc in launched] == [0, 0, 0]
    with cli_instance(project) as instance:
        steps = [
            (step, span)
            for record in instance.get_runs()
            for step, span in step_spans(instance, record.run_id).items()
        ]
    (ssc,) = [span for step, span in steps if step == "captioner_ssc"]
    (dsc,) = [span for step, span in steps if step == "captioner_dsc"]
    assert ssc[1] <= dsc[0] or dsc[1] <= ssc[0], (ssc, dsc)
    data = max(span for step, span in steps if step == "raw_pairs")  # the other project's
    assert data[0] < max(ssc[1], dsc[1]) and min(ssc[0], dsc[0]) < data[1], (data, ssc, dsc)


def test_sigkill_leaves_nothing_behind(project):
    """A materialization killed mid-write: the next one removes its staging folder, marks its
    Dagster run failed and closes its MLflow run; the live asset never changed."""
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    big = params | {"raw_pairs": params["raw_pairs"] | {"splits": {
        "train": 50000, "labelled": 8, "clip": 8, "eval": 8}}}
    (project.root / "big.yaml").write_text(yaml.safe_dump(big))
    env = {**project.env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "DALLE3_PARAMS": str(project.root / "big.yaml")}
    cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "dalle3_dag.definitions",
           "--select", "raw_pairs"]
    proc = subprocess.Popen(cmd, cwd=project.root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assets = project.root / "assets"
    deadline = time.monotonic() + 240
    while not list(assets.glob(".raw_pairs.tmp-*/train/00001.tar")):
        assert proc.poll() is None and time.monotonic() < deadline, "never started writing"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(assets.glob(".raw_pairs.tmp-*")) and not (assets / "raw_pairs").exists()
    with cli_instance(project) as instance:
        (killed,) = instance.get_runs()
        assert killed.status == dg.DagsterRunStatus.STARTED
    mlflow.set_tracking_uri(project.mlflow.resolved_uri())
    (stuck,) = mlflow.search_runs(experiment_names=["dalle3-dag"], output_format="list")
    assert stuck.info.status == "RUNNING"

    run(cmd, project)

    assert list(assets.glob(".raw_pairs.tmp-*")) == []
    assert json.loads((assets / "raw_pairs" / "summary.json").read_text())["splits"]
    with cli_instance(project) as instance:
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
    assert mlflow.get_run(stuck.info.run_id).info.status == "KILLED"
    statuses = {r.info.status for r in mlflow.search_runs(
        experiment_names=["dalle3-dag"], output_format="list")}
    assert statuses == {"KILLED", "FINISHED"}


def test_bad_params_stop_a_run_before_any_work(project):
    """A blend setting that cannot work fails the code location's load, so not even
    raw_pairs runs: the error names the section and the field."""
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["mixed_training_set"]["synthetic_ratio"] = 1.5
    params["raw_pairs"]["shard_sise"] = 16
    for problem, named in (
        ({"mixed_training_set": params["mixed_training_set"]}, "mixed_training_set:"),
        ({"raw_pairs": params["raw_pairs"]}, "raw_pairs: unknown field(s) ['shard_sise']"),
        ({"raw_pair": {}}, "unknown section(s) ['raw_pair']"),
    ):
        good = yaml.safe_load((project.root / "params.yaml").read_text())
        (project.root / "bad.yaml").write_text(yaml.safe_dump(good | problem))
        proc = subprocess.run(
            [str(BIN / "dagster"), "asset", "materialize", "-m", "dalle3_dag.definitions",
             "--select", "*"],
            cwd=project.root, capture_output=True, text=True,
            env={**project.env(), "DALLE3_PARAMS": str(project.root / "bad.yaml")},
        )
        assert proc.returncode != 0
        assert named in proc.stderr, proc.stderr[-2000:]
        assert not (project.root / "assets").exists()


def materialized_by_run(instance: dg.DagsterInstance) -> dict[str, set[str]]:
    """Each run's job name and the assets it materialized, by run id."""
    return {
        r.run_id: {
            e.dagster_event.asset_key.to_user_string()
            for e in instance.all_logs(r.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        }
        for r in instance.get_runs()
    }


def test_run_rebuilds_only_what_is_missing_or_stale(project):
    """The whole CI profile through `dalle3 run` (the Dagster CLI, as `make run`), then the
    ablations (as `make ablation`, one run per partition): every asset check passes and DVC is
    clean. A second run recomputes nothing; a changed params section reruns its stage and what
    is downstream of it, nothing else."""
    from dalle3_dag.definitions import defs

    dalle3 = [str(BIN / "dalle3"), "run"]
    pipeline = run(dalle3, project)
    assert "ablation_model" not in pipeline
    ablation = run([*dalle3, "--select", "ablation_model,ablation_report"], project)
    assert "ablation_model [alt-seed0]" in ablation and "ablation_model [dsc95-seed0]" in ablation
    graph = defs.resolve_asset_graph()
    with cli_instance(project) as instance:
        first = materialized_by_run(instance)
        evaluations = [
            e.dagster_event.event_specific_data
            for run_id in first
            for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        ]
    every = {key.to_user_string() for key in graph.materializable_asset_keys}
    assert set().union(*first.values()) == every
    assert {e.asset_check_key for e in evaluations} == set(graph.asset_check_keys)
    assert [e.check_name for e in evaluations if not e.passed] == []
    assert "up to date" in run([sys.executable, "-m", "dvc", "status"], project)

    started = time.monotonic()
    second = run([*dalle3, "--select", "*"], project)
    assert time.monotonic() - started < 60
    assert "up to date, not rerun: raw_pairs, clip_encoder" in second
    with cli_instance(project) as instance:
        new = {k: v for k, v in materialized_by_run(instance).items() if k not in first}
        jobs = {instance.get_run_by_id(k).job_name for k in new}
    assert jobs == {"observe_sources"} and set().union(*new.values()) == set()

    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["prompt_upsampler"]["train"]["steps"] += 2
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))
    run(dalle3, project)
    with cli_instance(project) as instance:
        after = materialized_by_run(instance)
    rerun = set().union(*(v for k, v in after.items() if k not in first and k not in new))
    assert rerun == {"prompt_upsampler", "clip_s_eval"}
    assert "up to date" in run([sys.executable, "-m", "dvc", "status"], project)


def test_cli_lists_the_schedule_and_sensor(project):
    location = ["-m", "dalle3_dag.definitions"]
    assert "Validation successful" in run(
        [str(BIN / "dagster"), "definitions", "validate", *location], project
    )
    assert "nightly_rebuild" in run([str(BIN / "dagster"), "schedule", "list", *location], project)
    assert "new_raw_shards" in run([str(BIN / "dagster"), "sensor", "list", *location], project)


def test_two_runs_started_together_on_a_fresh_project(project):
    """Two `dalle3 run` at the same moment on a fresh project: one runs, the other stops at
    once naming it, before either creates the Dagster instance's storage; the instance works
    after (a race here once broke it for good)."""
    env = {**project.env(), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "dalle3"), "run", "--select", "raw_pairs"]
    procs = [
        subprocess.Popen(cmd, cwd=project.root, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
        for _ in range(2)
    ]
    results = [(proc.wait(timeout=600), *proc.communicate()) for proc in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    (refused,) = [err for code, _, err in results if code == 1]
    assert "this project is being run by dalle3 run (pid" in refused
    assert "raw_pairs: done" in next(out for code, out, _ in results if code == 0)
    assert "up to date, not rerun: raw_pairs" in run(cmd, project)
    with cli_instance(project) as instance:
        jobs = sorted((r.job_name, r.status.value) for r in instance.get_runs())
    # the refused run launched nothing: the first run's observation and materialization, and
    # the third's observation
    assert jobs == [("__ASSET_JOB", "SUCCESS"), ("observe_sources", "SUCCESS")] + [
        ("observe_sources", "SUCCESS")
    ]
