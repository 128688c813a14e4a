"""Faults a shared deployment meets, injected against real servers on 127.0.0.1: the S3 server
gone during an asset upload and during `dvc push`, the MLflow server killed while a trainer
runs, a trainer killed with its node (resumed elsewhere from its S3 checkpoint), and malformed
config for every asset. Each is survived, and nothing is lost.

(SIGKILL of each trainer is in test_train.py and test_e2e_cli.py, a recaptioning run killed
mid-shard in test_recaption.py, corrupt and pickled weights in test_unreadable_files.py.)
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import dagster as dg
import pytest
import yaml
from mlflow import MlflowClient
from servers import BIN, Outage, cli, mlflow_server

from dalle3_dag import checkpoint_mirror, s3_store
from dalle3_dag.data import raw_pairs
from dalle3_dag.definitions import STAGES, defs
from dalle3_dag.project import validate_params
from dalle3_dag.resources import StorageResource
from dalle3_dag.retries import is_transient
from ml.clip import load_clip

MB = 1 << 20


def objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, by key."""
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_s3_outage_during_an_asset_upload_never_shows_a_partial_version(s3_server, tmp_path):
    """The connection dies halfway through a multipart upload of a new version: the old
    version stays live and whole for readers, the failure is one the step retries, and once
    the server is back the same publish completes."""
    direct = boto3.client("s3", endpoint_url=s3_server)
    direct.create_bucket(Bucket="store")
    proxy = Outage(s3_server)
    storage = StorageResource(root=str(tmp_path / "assets"), s3_uri="s3://store/toy",
                              endpoint_url=proxy.url, multipart_mb=5)  # fmt: skip
    folder = storage.asset_dir("model")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"version": 1}')
    (folder / "weights.safetensors").write_bytes(os.urandom(MB))
    storage.publish("model")
    first = s3_store.manifest_of(folder)

    (folder / "config.json").write_text('{"version": 2}')
    (folder / "weights.safetensors").write_bytes(os.urandom(12 * MB))  # three 5 MB parts
    second = s3_store.manifest_of(folder)
    proxy.cut_after(6 * MB)
    with pytest.raises(Exception) as failed:
        storage.publish("model")
    assert is_transient(failed.value), repr(failed.value)

    assert s3_store.live_version(direct, "store", "toy/model") == s3_store.version_id(first)
    reader = StorageResource(root=str(tmp_path / "reader"), s3_uri="s3://store/toy",
                             endpoint_url=s3_server)  # fmt: skip
    assert reader.pull("model")
    assert s3_store.manifest_of(reader.asset_dir("model")) == first
    # what reached the server of version 2 is no version: no manifest, no unfinished object
    base = f"toy/model/versions/{s3_store.version_id(second)}/"
    landed = {key.removeprefix(base): body for key, body in objects(direct, "store", base).items()}
    assert s3_store.MANIFEST not in landed and "weights.safetensors" not in landed
    for name, body in landed.items():
        assert body == (folder / name).read_bytes(), name

    proxy.restore()
    uri = storage.publish("model")
    assert uri == f"s3://store/{base.rstrip('/')}"
    later = StorageResource(root=str(tmp_path / "later"), s3_uri="s3://store/toy",
                            endpoint_url=s3_server)  # fmt: skip
    assert later.pull("model")
    assert s3_store.manifest_of(later.asset_dir("model")) == second


def cache_files(repo: Path) -> dict[str, Path]:
    """DVC's cache, by the md5 each file is named after."""
    root = repo / ".dvc" / "cache" / "files" / "md5"
    return {f"{p.parent.name}{p.name}": p for p in root.glob("*/*")}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_s3_outage_during_dvc_push_loses_nothing(project, s3_server):
    """`dvc push` cut off halfway: it fails, the local cache is whole, every object the remote
    holds is whole; pushed again once the server is back, the remote is complete and a clone
    with an empty cache gets every file back."""
    assert dg.materialize([raw_pairs], resources=project.resources).success
    direct = boto3.client("s3", endpoint_url=s3_server)
    direct.create_bucket(Bucket="dvc-remote")
    proxy = Outage(s3_server)
    env = project.env()
    dvc = [sys.executable, "-m", "dvc"]
    cli([*dvc, "remote", "add", "-d", "s3", "s3://dvc-remote/store"], env, project.root)
    cli([*dvc, "remote", "modify", "s3", "endpointurl", proxy.url], env, project.root)
    cached = cache_files(project.root)
    total = sum(p.stat().st_size for p in cached.values())
    assert len(cached) > 3

    proxy.cut_after(total // 2)
    cli([*dvc, "push"], env, project.root, ok=False)
    for name, path in cached.items():  # the cache is intact: every file still matches its name
        assert md5(path.read_bytes()) == name.removesuffix(".dir"), path
    assert "up to date" in cli([*dvc, "status", "raw_pairs"], env, project.root)
    remote = objects(direct, "dvc-remote", "store/")
    assert len(remote) < len(cached), "the cut came after the push had finished"
    for key, body in remote.items():  # none half-written
        assert md5(body) == "".join(key.split("/")[-2:]).removesuffix(".dir"), key

    proxy.restore()
    cli([*dvc, "push"], env, project.root)
    assert "in sync" in cli([*dvc, "status", "-c", "raw_pairs"], env, project.root)
    assert len(objects(direct, "dvc-remote", "store/")) == len(cached)
    before = s3_store.manifest_of(project.storage.asset_dir("raw_pairs"))
    shutil.rmtree(project.root / ".dvc" / "cache")
    shutil.rmtree(project.storage.asset_dir("raw_pairs"))
    cli([*dvc, "pull", "raw_pairs"], env, project.root)
    assert s3_store.manifest_of(project.storage.asset_dir("raw_pairs")) == before


def clip_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("dalle3-dag")
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id], filter_string="tags.`dagster.asset_key` = 'clip_encoder'"
    )


def test_mlflow_server_killed_during_training_retries_and_leaves_no_run_running(
    project, tmp_path
):
    """The tracking server dies mid-training: the step fails as a transient failure and
    Dagster retries it; with the server back, it resumes from its checkpoint and finishes.
    The interrupted MLflow run is closed as KILLED, never left RUNNING."""
    materialize = [str(BIN / "dagster"), "asset", "materialize", "-m", "dalle3_dag.definitions"]
    train = {"steps": 300, "checkpoint_every": 20, "log_every": 1}
    config = {"ops": {"clip_encoder": {"config": {"train": train}}}}
    with mlflow_server(tmp_path / "mlflow", str(tmp_path / "mlflow-artifacts"),
                       dict(os.environ)) as server:  # fmt: skip
        env = project.env() | {
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": server.url,
            # fail at once rather than after MLflow's own minutes of backoff
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
        }
        cli([*materialize, "--select", "raw_pairs"], env, project.root)
        log = tmp_path / "materialize.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [*materialize, "--select", "clip_encoder", "--config-json", json.dumps(config)],
                cwd=project.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            client = MlflowClient(server.url)
            deadline = time.monotonic() + 300
            while not any(  # the trainer is past its first checkpoint
                len(client.get_metric_history(r.info.run_id, "loss")) > train["checkpoint_every"]
                for r in clip_runs(client)
            ):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "clip_encoder never started training"
                time.sleep(0.2)
            server.kill()
            with dg.DagsterInstance.from_config(str(project.root / ".dagster")) as instance:
                while not instance.get_records_for_run(
                    instance.get_runs(limit=1)[0].run_id,
                    of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY,
                ).records:
                    assert proc.poll() is None, log.read_text()[-3000:]
                    assert time.monotonic() < deadline, "the step never asked for a retry"
                    time.sleep(0.5)
            server.start()
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text()
        assert "transient failure" in text and "resumed from the checkpoint at step" in text
        statuses = sorted(r.info.status for r in clip_runs(MlflowClient(server.url)))
        assert statuses == ["FINISHED", "KILLED"]
    load_clip(project.storage.asset_dir("clip_encoder"))
    # DVC recorded the run as it ran: the version made, with the run's overrides
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())["stages"]["clip_encoder"]
    assert lock["params"]["params.yaml"]["clip_encoder"]["train"]["steps"] == train["steps"]
    assert lock["outs"][0]["md5"] == project.dvc.out_hash("clip_encoder")


def a_number_field(values: dict) -> tuple[list[str], object]:
    """The path and value of the first int or float field in a params section, at any depth."""
    for name, value in values.items():
        if isinstance(value, dict) and (found := a_number_field(value))[0]:
            return [name, *found[0]], found[1]
        if isinstance(value, int | float) and not isinstance(value, bool):
            return [name], value
    return [], None


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_malformed_config_is_refused_naming_the_field(stage, project, monkeypatch):
    """A value of the wrong type, in params.yaml or in a run's config, is refused before any
    work, naming the field, and the live version of the asset stays as it was."""
    key = stage.name
    live = project.storage.asset_dir(key)
    live.mkdir(parents=True)
    (live / "weights.safetensors").write_bytes(b"the live version")
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    path, _ = a_number_field(params[key])
    assert path, f"{key} has no number field to break"

    broken = json.loads(json.dumps(params))
    holder = broken[key]
    for name in path[:-1]:
        holder = holder[name]
    holder[path[-1]] = "lots"
    (project.root / "broken.yaml").write_text(yaml.safe_dump(broken))
    monkeypatch.setenv("DALLE3_PARAMS", str(project.root / "broken.yaml"))
    from dalle3_dag.definitions import PARAMS

    with pytest.raises(ValueError, match=rf"{key}\.{'.'.join(path)}: "):
        validate_params(PARAMS, project.root)
    monkeypatch.setenv("DALLE3_PARAMS", str(project.root / "params.yaml"))

    override: dict = {path[-1]: "lots"}
    for name in reversed(path[:-1]):
        override = {name: override}
    asset = next(a for a in defs.assets if dg.AssetKey(key) in getattr(a, "keys", ()))
    with pytest.raises(dg.DagsterInvalidConfigError, match=path[-1]):
        dg.materialize(
            [asset],
            resources=project.resources,
            run_config={"ops": {key: {"config": override}}},
            selection=[key],
        )
    assert [p.name for p in live.iterdir()] == ["weights.safetensors"]
    assert (live / "weights.safetensors").read_bytes() == b"the live version"


def test_a_trainer_killed_with_its_node_resumes_elsewhere_from_its_s3_checkpoint(
    project, s3_server
):
    """SIGKILL mid-training and the node's disk gone: the rerun on a fresh disk pulls the
    newest checkpoint the step had uploaded, byte for byte, and resumes from it."""
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="assets")
    env = project.env() | {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DALLE3_S3_URI": "s3://assets/toy",
        "AWS_ENDPOINT_URL_S3": s3_server,
    }
    materialize = [str(BIN / "dagster"), "asset", "materialize", "-m", "dalle3_dag.definitions"]
    cli([*materialize, "--select", "raw_pairs"], env, project.root)
    train = {"steps": 400, "checkpoint_every": 20, "log_every": 20}
    config = ["--config-json", json.dumps({"ops": {"clip_encoder": {"config": {"train": train}}}})]
    command = [*materialize, "--select", "clip_encoder", *config]
    proc = subprocess.Popen(command, cwd=project.root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    newest = None
    try:
        deadline = time.monotonic() + 300
        while newest is None:
            assert proc.poll() is None, "clip_encoder ended before a checkpoint was uploaded"
            assert time.monotonic() < deadline, "no checkpoint reached S3"
            listed = s3.list_objects_v2(Bucket="assets", Prefix="toy/checkpoints/clip_encoder/")
            for item in listed.get("Contents", []):
                if item["Key"].endswith(f"/{checkpoint_mirror.NEWEST}"):
                    newest = s3.get_object(Bucket="assets", Key=item["Key"])["Body"].read()
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    step = int(newest.decode().removeprefix("step-"))
    assert 0 < step < train["steps"]
    shutil.rmtree(project.root / "assets" / ".checkpoints")  # the node and its disk are gone

    log = cli(command, env, project.root)  # would wait forever if the dead run kept its slot
    with dg.DagsterInstance.from_config(str(project.root / ".dagster")) as instance:
        statuses = sorted(r.status.value for r in instance.get_runs())
    assert statuses == ["FAILURE", "SUCCESS", "SUCCESS"]  # the killed one, raw_pairs, the rerun
    assert f"clip_encoder: pulled the checkpoint at step {step} from s3://assets/toy" in log
    assert f"resumed from the checkpoint at step {step}" in log
    load_clip(project.storage.asset_dir("clip_encoder"))
