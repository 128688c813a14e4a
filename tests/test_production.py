"""The caption stages on shared infrastructure, through the real CLIs: the asset store on S3,
DVC's remote on S3 and an MLflow tracking server whose artifacts are on S3, all on one
S3-compatible server (moto) on 127.0.0.1, with credentials only in the environment."""

import json
import os
import shutil
import sys
from pathlib import Path

import boto3
import dagster as dg
import pytest
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from servers import BIN, cli, mlflow_server

from dalle3_dag import s3_store
from dalle3_dag.resources import StorageResource
from ml.clip import load_clip
from ml.files import UnreadableFile

pytestmark = pytest.mark.e2e
SECRET = "s3cr3t-only-in-the-environment"  # moto accepts any key; this one must leak nowhere
CAPTION_STAGES = ["raw_pairs", "clip_encoder", "captioner_base"]


def s3_env(endpoint: str) -> dict[str, str]:
    """What a user exports: credentials and one endpoint, which boto3, DVC and MLflow read."""
    return {
        "AWS_ACCESS_KEY_ID": "dalle3-test",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


def materialize(select: str, env: dict[str, str], cwd) -> str:
    cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "dalle3_dag.definitions"]
    return cli([*cmd, "--select", select], env, cwd)


def test_caption_stages_on_s3_dvc_and_an_mlflow_server(project, s3_server, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for bucket in ("assets", "versions", "mlflow"):
        s3.create_bucket(Bucket=bucket)
    creds = s3_env(s3_server)
    with mlflow_server(tmp_path / "mlflow", "s3://mlflow/artifacts", os.environ | creds) as server:
        env = project.env() | creds | {
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": server.url,
            "DALLE3_S3_URI": "s3://assets/toy",
        }
        materialize(",".join(CAPTION_STAGES), env, project.root)

        # 1. the asset store: every asset live on S3 whole, equal to the local copy
        storage = StorageResource(root=str(tmp_path / "elsewhere"), s3_uri="s3://assets/toy",
                                  endpoint_url=s3_server)  # fmt: skip
        for key in CAPTION_STAGES:
            assert storage.pull(key), key
            local = s3_store.manifest_of(project.storage.asset_dir(key))
            assert s3_store.manifest_of(storage.asset_dir(key)) == local, key

        # a worker without the inputs pulls them from S3, and DVC finds them unchanged
        for key in ("clip_encoder", "captioner_base"):
            shutil.rmtree(project.storage.asset_dir(key))
        log = materialize("captioner_ssc", env, project.root)
        assert "captioner_base: pulled its live version from s3://assets/toy" in log
        dvc = [sys.executable, "-m", "dvc"]
        status = cli([*dvc, "status", *CAPTION_STAGES, "captioner_ssc"], env, project.root)
        assert "up to date" in status, status

        # 2. DVC's remote on the same S3 server: pushed, and complete (`status -c`)
        cli([*dvc, "remote", "add", "-d", "s3", "s3://versions/store"], env, project.root)
        cli([*dvc, "remote", "modify", "s3", "endpointurl", s3_server], env, project.root)
        cli([*dvc, "push"], env, project.root)
        assert "up to date" in cli([*dvc, "status", "-c"], env, project.root)

        # 3. the tracking server: runs, metrics, images and the registered model, read back
        client = MlflowClient(server.url)
        (experiment,) = [e for e in client.search_experiments() if e.name == "dalle3-dag"]
        runs = client.search_runs([experiment.experiment_id])
        by_key = {r.data.tags["dagster.asset_key"]: r for r in runs}
        assert set(by_key) == {*CAPTION_STAGES, "captioner_ssc"}
        assert {r.info.status for r in runs} == {"FINISHED"}
        base = by_key["captioner_base"]
        assert len(client.get_metric_history(base.info.run_id, "loss")) >= 2
        assert _pngs(client, base.info.run_id)
        (version,) = client.search_model_versions("name = 'captioner_base'")
        model = download_artifacts(artifact_uri=version.source, tracking_uri=server.url,
                                   dst_path=str(tmp_path / "registered"))  # fmt: skip
        assert s3_store.manifest_of(Path(model)) == s3_store.manifest_of(
            project.storage.asset_dir("captioner_base")
        )
        stored = s3.list_objects_v2(Bucket="mlflow", Prefix="artifacts/")["KeyCount"]
        assert stored > 0  # the server put the artifacts on S3, not on its disk
        assert not (project.root / "mlartifacts").exists()

        # 4. credentials: in the environment only, never in metadata, run records or config
        with dg.DagsterInstance.from_config(str(project.root / ".dagster")) as instance:
            records = [
                str(entry.dagster_event or entry.user_message)
                for run in instance.get_runs()
                for entry in instance.all_logs(run.run_id)
            ]
        assert records and not [r for r in records if SECRET in r]
        for run in runs:
            assert SECRET not in json.dumps([run.data.params, run.data.tags])
        assert SECRET not in (project.root / ".dvc" / "config").read_text()

        # 5. a truncated model file is named, and DVC's cache brings the version back
        folder = project.storage.asset_dir("clip_encoder")
        (weights,) = folder.glob("*.safetensors")
        weights.write_bytes(weights.read_bytes()[:1000])
        with pytest.raises(UnreadableFile, match=weights.name):
            load_clip(folder)
        assert "modified" in cli([*dvc, "status", "clip_encoder"], env, project.root)
        cli([*dvc, "checkout", "--force", "clip_encoder"], env, project.root)
        load_clip(folder)


def _pngs(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    """Every PNG artifact of a run, at any depth."""
    found = []
    for artifact in client.list_artifacts(run_id, path):
        if artifact.is_dir:
            found += _pngs(client, run_id, artifact.path)
        elif artifact.path.endswith(".png"):
            found.append(artifact.path)
    return found
