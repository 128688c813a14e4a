"""Trainers on two processes: torchrun (DDP over gloo) launched through Dagster Pipes makes the
same asset as one process, at the same global batch."""

import dagster as dg
import mlflow
import pytest
import yaml

from dalle3_dag.definitions import defs
from dalle3_dag.launch import LaunchConfig, torchrun

UPSTREAM = [
    "raw_pairs", "clip_encoder", "captioner_base", "captioner_ssc", "captioner_dsc",
    "image_autoencoder",
]  # fmt: skip


def materialize(project, instance, select, **kwargs) -> dg.ExecuteInProcessResult:
    assets = [*defs.assets, *defs.asset_checks]
    return dg.materialize(
        assets, selection=select, resources=project.resources, instance=instance, **kwargs
    )


def trained(project, instance) -> tuple[list[float], set[str], dict]:
    """Train diffusion_model: its loss curve from MLflow, its files, its metadata."""
    result = materialize(project, instance, ["diffusion_model"])
    assert result.success
    (event,) = result.asset_materializations_for_node("diffusion_model")
    run_id = event.metadata["mlflow_run_id"].value
    mlflow.set_tracking_uri(project.mlflow.resolved_uri())
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    losses = [m.value for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")]
    folder = project.storage.asset_dir("diffusion_model")
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return losses, files, {k: v.value for k, v in event.metadata.items()}


def test_two_processes_train_the_same_asset_as_one(project):
    with dg.instance_for_test() as instance:
        assert materialize(project, instance, UPSTREAM).success
        for shard in instance.get_dynamic_partitions("raw_pairs_shards"):
            assert materialize(
                project, instance, ["recaptioned_dataset"], partition_key=shard
            ).success
        assert materialize(project, instance, ["mixed_training_set"]).success
        one_losses, one_files, one = trained(project, instance)

        params = yaml.safe_load((project.root / "params.yaml").read_text())
        params["launch"]["processes_per_node"] = 2
        params["diffusion_model"]["train"]["batch_size"] //= 2  # the same global batch
        (project.root / "params.yaml").write_text(yaml.safe_dump(params))
        two_losses, two_files, two = trained(project, instance)

    assert two["processes"] == 2
    assert two_files == one_files  # the same diffusers layout, grids and sidecars
    assert two["dvc_hash"] == project.dvc.out_hash("diffusion_model") != one["dvc_hash"]
    # the same samples per step, but each rank draws its own noise: measured 1-3% apart
    assert len(two_losses) == len(one_losses)
    assert two_losses == pytest.approx(one_losses, rel=0.1)


def test_multi_node_command_meets_at_the_rendezvous(tmp_path):
    launch = LaunchConfig(processes_per_node=8, nodes=4, node_rank=2, rdzv_endpoint="n0:29400")
    cmd = torchrun(launch, tmp_path / "request.json")
    assert cmd[3:8] == [
        "--nproc-per-node=8", "--nnodes=4", "--node-rank=2", "--rdzv-backend=c10d",
        "--rdzv-endpoint=n0:29400",
    ]
    assert cmd[-3:] == ["-m", "dalle3_dag.worker", str(tmp_path / "request.json")]
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        LaunchConfig(nodes=2)
