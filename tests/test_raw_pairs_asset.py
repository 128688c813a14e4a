"""In-process materialization of `raw_pairs`: config, checks, DVC hash, MLflow run, bad input."""

import io
import json
import tarfile
from pathlib import Path

import dagster as dg
import mlflow
import pytest
import webdataset as wds

from dalle3_dag import raw_pairs as raw_pairs_module
from dalle3_dag.raw_pairs import raw_pairs
from dalle3_dag.resources import StorageResource
from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.data.shards import list_shards, write_shards

CHECKS = dg.load_asset_checks_from_modules([raw_pairs_module])


def materialize(project, run_config=None) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [raw_pairs, *CHECKS],
        resources=project.resources,
        run_config=run_config or {},
        raise_on_error=False,
    )


def materialization(result: dg.ExecuteInProcessResult) -> dg.AssetMaterialization:
    (event,) = result.asset_materializations_for_node("raw_pairs")
    return event


def test_shapeworld_materializes_with_checks_dvc_and_mlflow(project):
    result = materialize(project)
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {
        "raw_pairs_sample_count": True,
        "raw_pairs_decode_failures": True,
        "raw_pairs_caption_lengths": True,
    }
    meta = materialization(result).metadata
    assert meta["samples_per_split"].value == {"train": 64, "labelled": 32, "clip": 32, "eval": 16}
    assert "data:image/png;base64," in meta["preview"].value

    # plain webdataset reads what we wrote
    out = project.storage.asset_dir("raw_pairs")
    dataset = wds.WebDataset(list_shards(str(out / "train")), shardshuffle=False)
    keys = [sample["__key__"] for sample in dataset]
    assert len(keys) == 64 and len(set(keys)) == 64

    # the DVC hash is in dvc.lock, is the Dagster data version and an MLflow tag
    data_hash = project.dvc.out_hash("raw_pairs")
    assert data_hash and data_hash.endswith(".dir")
    assert meta["dvc_hash"].value == data_hash
    assert materialization(result).tags["dagster/data_version"] == data_hash
    mlflow.set_tracking_uri(project.mlflow.resolved_uri())
    run = mlflow.get_run(meta["mlflow_run_id"].value)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc.hash"] == data_hash
    assert run.data.tags["dagster.asset_key"] == "raw_pairs"
    assert run.data.params["splits.train"] == "64"


def test_rematerializing_the_same_params_gives_the_same_hash(project):
    assert materialize(project).success
    first = project.dvc.out_hash("raw_pairs")
    assert materialize(project).success
    assert project.dvc.out_hash("raw_pairs") == first


def test_run_config_overrides_params(project):
    result = materialize(project, {"ops": {"raw_pairs": {"config": {
        "splits": {"train": 40, "labelled": 8, "clip": 8, "eval": 8},
        "world": {"noise": {"empty": 0.0, "irrelevant": 0.0}},
    }}}})
    assert result.success
    meta = materialization(result).metadata
    assert meta["samples_per_split"].value["train"] == 40
    assert meta["caption_words"].value["empty_frac"] == 0.0


def test_bad_params_fail_naming_the_field_and_keep_the_old_asset(project):
    assert materialize(project).success
    before = project.dvc.out_hash("raw_pairs")
    bad = {"world": {"noise": {"terse": 1.5}}}
    result = materialize(project, {"ops": {"raw_pairs": {"config": bad}}})
    assert not result.success
    error = result.failure_data_for_node("raw_pairs").error
    assert "terse" in str(error)
    assert project.dvc.out_hash("raw_pairs") == before
    assert (project.storage.asset_dir("raw_pairs") / "summary.json").exists()
    leftovers = [p.name for p in project.storage.asset_dir("raw_pairs").parent.iterdir()]
    assert leftovers == ["raw_pairs"]


def _corrupt_shards(folder: Path) -> None:
    """Two good shards, one with a garbage PNG, and a truncated third shard."""
    samples = list(generate(48, seed=7, cfg=ShapeWorldConfig(), split="web"))
    write_shards(samples[:40], folder, shard_size=20)
    bad = folder / "00001.tar"
    with tarfile.open(bad, "a") as tar:
        for name, data in (("broken.png", b"\x89PNG not really"), ("broken.txt", b"oops")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_shards(samples[40:], folder / "extra", shard_size=8)
    whole = (folder / "extra" / "00000.tar").read_bytes()
    (folder / "00002.tar").write_bytes(whole[: len(whole) // 2])


def test_corrupt_webdataset_input_is_skipped_and_reported(project, tmp_path):
    source = tmp_path / "incoming"
    _corrupt_shards(source)
    result = materialize(project, {"ops": {"raw_pairs": {"config": {
        "source": "webdataset", "uri": str(source),
    }}}})
    assert result.success
    meta = materialization(result).metadata
    skipped = meta["skipped"].value["train"]
    assert skipped["skipped_images"] == 1
    assert skipped["truncated_shards"] == 1
    kept = meta["samples_per_split"].value["train"]
    assert 40 <= kept < 48
    summary = json.loads((project.storage.asset_dir("raw_pairs") / "summary.json").read_text())
    assert summary["source"] == "webdataset"


def test_s3_source_and_mirror(project, s3_server, tmp_path):
    storage = StorageResource(
        root=project.storage.root, endpoint_url=s3_server, s3_uri="s3://mirror/toy"
    )
    client = storage.s3_client()
    for bucket in ("incoming", "mirror"):
        client.create_bucket(Bucket=bucket)
    local = tmp_path / "shards"
    write_shards(generate(30, seed=1, cfg=ShapeWorldConfig(), split="web"), local, shard_size=16)
    for path in local.iterdir():
        client.upload_file(str(path), "incoming", f"pairs/{path.name}")

    result = dg.materialize(
        [raw_pairs],
        resources={**project.resources, "storage": storage},
        run_config={"ops": {"raw_pairs": {"config": {
            "source": "webdataset", "uri": "s3://incoming/pairs",
        }}}},
    )
    meta = materialization(result).metadata
    assert meta["samples_per_split"].value == {"train": 30}
    assert meta["s3_uri"].value == "s3://mirror/toy/raw_pairs"
    listed = client.list_objects_v2(Bucket="mirror", Prefix="toy/raw_pairs/")
    names = {o["Key"] for o in listed["Contents"]}
    assert {"toy/raw_pairs/summary.json", "toy/raw_pairs/train/00000.tar"} <= names


@pytest.mark.parametrize("field,value", [("source", "flickr"), ("shard_size", 0)])
def test_invalid_config_names_the_field(project, field, value):
    result = materialize(project, {"ops": {"raw_pairs": {"config": {field: value}}}})
    assert not result.success
    assert field in str(result.failure_data_for_node("raw_pairs").error)
