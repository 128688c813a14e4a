"""In-process materialization of `raw_pairs`: config, checks, DVC hash, MLflow run, bad input."""

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import dagster as dg
import mlflow
import pytest
import webdataset as wds
import yaml
from conftest import web_source, write_web_shards
from dagster._core.definitions.data_version import (
    CachingStaleStatusResolver,
    StaleStatus,
    extract_data_version_from_entry,
)
from dagster._core.loader import LoadingContextForTest

from dalle3_dag import s3_store
from dalle3_dag.data import observe_sources, raw_pairs, raw_pairs_source
from dalle3_dag.resources import StorageResource, remove_orphans
from ml.data.raw_pairs import load_split, split_of
from ml.data.shards import list_shards, read_shards
from ml.stage import CONFIG_FILE as CONFIG


def materialize(project, run_config=None, instance=None) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [raw_pairs],
        resources=project.resources,
        run_config=run_config or {},
        raise_on_error=False,
        instance=instance,
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
    assert "data:image/png;base64," in meta["examples"].value

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


def locked_params(project) -> dict:
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    return lock["stages"]["raw_pairs"]["params"]["params.yaml"]["raw_pairs"]


def test_run_config_overrides_params_and_dvc_lock_records_them(project):
    result = materialize(project, {"ops": {"raw_pairs": {"config": {
        "splits": {"train": 40, "labelled": 8, "clip": 8, "eval": 8},
        "world": {"noise": {"empty": 0.0, "irrelevant": 0.0}},
    }}}})
    assert result.success
    meta = materialization(result).metadata
    assert meta["samples_per_split"].value["train"] == 40
    assert meta["caption_words"].value["empty_frac"] == 0.0
    # what ran is in dvc.lock and in the folder, and DVC sees it is not params.yaml's
    assert locked_params(project)["splits"]["train"] == 40
    ran = json.loads((project.storage.asset_dir("raw_pairs") / CONFIG).read_text())
    assert ran["splits"]["train"] == 40 and ran["world"]["noise"]["empty"] == 0.0
    assert "up to date" not in project.dvc._dvc("status", "raw_pairs")
    assert materialize(project).success  # params.yaml as it is: up to date again
    assert "up to date" in project.dvc._dvc("status", "raw_pairs")


def test_another_params_file_is_recorded(project, monkeypatch):
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["raw_pairs"]["shard_size"] = 16
    other = project.root / "other.yaml"
    other.write_text(yaml.safe_dump(params))
    monkeypatch.setenv("DALLE3_PARAMS", str(other))
    assert materialize(project).success
    assert locked_params(project)["shard_size"] == 16
    assert "up to date" not in project.dvc._dvc("status", "raw_pairs")


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


def test_faulted_shards_are_rejected_and_the_previous_version_stays_live(project, tmp_path):
    """6 bad samples of 40 (rate 0.15) fail a blocking check: the run fails, the live asset,
    dvc.lock and the DVC hash are the previous version's, and the rejected one is kept."""
    assert materialize(project).success
    live = project.storage.asset_dir("raw_pairs")
    before = (project.dvc.out_hash("raw_pairs"), (project.root / "dvc.lock").read_bytes())
    source = tmp_path / "incoming"
    write_web_shards(source, 34, shard_size=17)
    with tarfile.open(source / "00001.tar", "a") as tar:  # 6 images that will not decode
        for i in range(6):
            for name, data in ((f"bad{i}.jpg", b"\xff\xd8 not a jpeg"), (f"bad{i}.txt", b"x")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    with dg.DagsterInstance.ephemeral() as instance:
        config = {"ops": {"raw_pairs": {"config": web_source(source)}}}
        result = materialize(project, config, instance)
        evaluations = {
            record.dagster_event.event_specific_data.check_name: (
                record.dagster_event.event_specific_data.passed
            )
            for record in instance.all_logs(
                result.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
            )
        }
    assert not result.success
    error = str(result.failure_data_for_node("raw_pairs").error)
    assert "raw_pairs_decode_failures" in error and "previous version stays live" in error
    assert (project.dvc.out_hash("raw_pairs"), (project.root / "dvc.lock").read_bytes()) == before
    assert json.loads((live / "summary.json").read_text())["source"] == "shapeworld"
    (rejected,) = project.storage.rejected_dir("raw_pairs").iterdir()
    assert str(rejected) in error
    summary = json.loads((rejected / "summary.json").read_text())
    assert summary["source"] == "webdataset" and summary["skipped"]["skipped_images"] == 6
    assert json.loads((rejected / CONFIG).read_text())["uri"] == str(source)
    assert evaluations["raw_pairs_decode_failures"] is False
    assert evaluations["raw_pairs_sample_count"] is True
    mlflow.set_tracking_uri(project.mlflow.resolved_uri())
    (run,) = mlflow.search_runs(
        experiment_names=["dalle3-dag"], filter_string="attributes.status = 'FAILED'",
        output_format="list",
    )
    assert run.data.tags["dalle3.rejected"] == str(rejected) and "dvc.hash" not in run.data.tags
    assert [p.name for p in live.parent.iterdir() if p.name.startswith(".raw_pairs")] == []


def test_corrupt_webdataset_input_is_skipped_counted_and_split_by_key(project, tmp_path):
    source = tmp_path / "incoming"
    write_web_shards(source, 80, shard_size=20)
    with tarfile.open(source / "00001.tar", "a") as tar:
        for name, data in (("broken.jpg", b"\xff\xd8 not really"), ("broken.txt", b"oops")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = (source / "00003.tar").read_bytes()
    (source / "00003.tar").write_bytes(whole[: len(whole) // 2])
    result = materialize(project, {"ops": {"raw_pairs": {"config": web_source(source)}}})
    assert result.success
    meta = materialization(result).metadata
    skipped = meta["skipped"].value
    assert (skipped["skipped_images"], skipped["truncated_shards"]) == (1, 1)
    assert skipped["skipped_truncated"] == 1
    counts = meta["samples_per_split"].value
    assert set(counts) == {"train", "labelled", "clip", "eval"} and min(counts.values()) > 0
    out = project.storage.asset_dir("raw_pairs")
    split_keys = {s: {x.key for x in load_split(out, s)} for s in counts}
    # every key in exactly one split; captioned samples outside eval form `labelled`, carrying
    # their captions under the names the captioner stages read
    assert sum(len(k) for k in split_keys.values()) == len(set().union(*split_keys.values()))
    labelled = load_split(out, "labelled")
    assert all(int(s.key[-4:]) % 3 == 0 for s in labelled)
    assert all(s.meta["short_caption"] == s.meta["human_short"] for s in labelled)
    for split in ("train", "clip", "eval"):
        assert all(split_of(key, 0, web_source(source)["fractions"]) == split
                   for key in split_keys[split])
    listing = json.loads((out / "source.json").read_text())
    assert [Path(e["uri"]).name for e in listing] == [f"0000{i}.tar" for i in range(4)]


def test_labelled_captions_from_a_sidecar_file(project, tmp_path):
    source = tmp_path / "incoming"
    write_web_shards(source, 30, captioned_every=1000)  # only sample 0 has JSON captions
    sidecar = tmp_path / "human.jsonl"
    rows = [
        {"key": s.key, "short_caption": f"short {s.key}", "descriptive_caption": f"long {s.key}"}
        for s in read_shards(str(source))
        if int(s.key[-4:]) % 2
    ]
    sidecar.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = web_source(source) | {"labelled": {"sidecar": str(sidecar)}}
    result = materialize(project, {"ops": {"raw_pairs": {"config": config}}})
    assert result.success
    labelled = load_split(project.storage.asset_dir("raw_pairs"), "labelled")
    assert labelled and all(s.meta["descriptive_caption"] == f"long {s.key}" for s in labelled)


def test_webdataset_without_labelled_captions_fails_before_any_work(project, tmp_path):
    source = tmp_path / "incoming"
    write_web_shards(source, 10)
    config = web_source(source) | {"labelled": {"short_field": "human_short"}}
    result = materialize(project, {"ops": {"raw_pairs": {"config": config}}})
    assert not result.success
    error = str(result.failure_data_for_node("raw_pairs").error)
    assert "labelled.descriptive_field" in error and "labelled.sidecar" in error
    assert not project.storage.asset_dir("raw_pairs").exists()


def test_s3_source_and_mirror(project, s3_server, tmp_path):
    storage = StorageResource(
        root=project.storage.root, endpoint_url=s3_server, s3_uri="s3://mirror/toy"
    )
    client = storage.s3_client()
    for bucket in ("incoming", "mirror"):
        client.create_bucket(Bucket=bucket)
    local = tmp_path / "shards"
    write_web_shards(local, 30, shard_size=16)
    for path in local.iterdir():
        client.upload_file(str(path), "incoming", f"pairs/{path.name}")

    config = web_source(local) | {"uri": "s3://incoming/pairs"}
    result = dg.materialize(
        [raw_pairs],
        resources={**project.resources, "storage": storage},
        run_config={"ops": {"raw_pairs": {"config": config}}},
    )
    meta = materialization(result).metadata
    assert sum(meta["samples_per_split"].value.values()) == 30
    version = s3_store.live_version(client, "mirror", "toy/raw_pairs")
    assert meta["s3_uri"].value == f"s3://mirror/toy/raw_pairs/versions/{version}"
    listed = client.list_objects_v2(Bucket="mirror", Prefix=f"toy/raw_pairs/versions/{version}/")
    names = {o["Key"].rsplit(f"{version}/", 1)[1] for o in listed["Contents"]}
    local_files = s3_store.manifest_of(project.storage.asset_dir("raw_pairs"))["files"]
    assert names == {*local_files, s3_store.MANIFEST}

    # a dead endpoint is reported before any work, naming the prefix
    dead = StorageResource(root=project.storage.root, endpoint_url="http://127.0.0.1:9")
    failed = dg.materialize(
        [raw_pairs],
        resources={**project.resources, "storage": dead},
        run_config={"ops": {"raw_pairs": {"config": config}}},
        raise_on_error=False,
    )
    error = str(failed.failure_data_for_node("raw_pairs").error)
    assert "cannot read s3://incoming/pairs: http://127.0.0.1:9 is unreachable" in error


def observe(project, instance) -> None:
    """Observe raw_pairs_source, as `dalle3 run` or the UI's "Observe sources" button does."""
    defs = dg.Definitions(
        assets=[raw_pairs_source], jobs=[observe_sources], resources=project.resources
    )
    assert defs.resolve_job_def("observe_sources").execute_in_process(instance=instance).success


def test_changed_source_shards_make_raw_pairs_stale(project, tmp_path):
    source = tmp_path / "incoming"
    write_web_shards(source, 40)
    defs = dg.Definitions(assets=[raw_pairs_source, raw_pairs], resources=project.resources)
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["raw_pairs"] |= web_source(source)
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))
    with dg.DagsterInstance.ephemeral() as instance:

        def status() -> StaleStatus:
            resolver = CachingStaleStatusResolver(
                instance, defs.resolve_asset_graph(), LoadingContextForTest(instance)
            )
            return resolver.get_status(dg.AssetKey("raw_pairs"))

        # as `dalle3 run` does: observe the source, then materialize what it feeds
        observe(project, instance)
        result = dg.materialize([raw_pairs_source, raw_pairs], selection=["raw_pairs"],
                                resources=project.resources, instance=instance)
        assert status() == StaleStatus.FRESH
        # the version it records is that of the listing it read, the one observed
        record = instance.get_latest_data_version_record(dg.AssetKey("raw_pairs_source"), True)
        observed = extract_data_version_from_entry(record.event_log_entry)
        assert materialization(result).metadata["source_version"].value == observed.value
        observe(project, instance)
        assert status() == StaleStatus.FRESH  # the same shards: nothing to do
        write_web_shards(source / "more", 5)
        (source / "more" / "00000.tar").rename(source / "00009.tar")
        observe(project, instance)
        assert status() == StaleStatus.STALE


def test_staging_folders_of_dead_writers_are_removed_by_the_next_write(project):
    root = Path(project.storage.root)
    root.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = root / f".raw_pairs.tmp-{dead.pid}-0badc0de"
    alive = root / f".raw_pairs.tmp-{os.getpid()}-11111111"
    other = root / f".clip_encoder.tmp-{dead.pid}-22222222"
    for folder in (orphan, alive, other):
        (folder / "train").mkdir(parents=True)
    with project.storage.writing("raw_pairs") as out:
        (out / "x").write_text("1")
    assert not orphan.exists() and alive.exists() and other.exists()
    assert (root / "raw_pairs" / "x").read_text() == "1"

    # killed mid-swap: the live version had been moved aside, and is put back, not removed
    (root / "raw_pairs").rename(root / f".raw_pairs.old-{dead.pid}-33333333")
    (root / f".raw_pairs.tmp-{dead.pid}-44444444").mkdir()
    assert remove_orphans(root, "raw_pairs") == [root / f".raw_pairs.tmp-{dead.pid}-44444444"]
    assert (root / "raw_pairs" / "x").read_text() == "1"


@pytest.mark.parametrize(
    "config,named",
    [
        ({"source": "flickr"}, "source"),
        ({"shard_size": 0}, "shard_size"),
        ({"splits": {"trian": 8}}, "splits: unknown split(s) ['trian']"),
        ({"world": {"image_size": 0}}, "image_size must be >= 8"),
        ({"fractions": {"train": 0.5}}, "fractions must be >= 0 and sum to 1"),
    ],
)
def test_invalid_config_names_the_field(project, config, named):
    result = materialize(project, {"ops": {"raw_pairs": {"config": config}}})
    assert not result.success
    assert named in str(result.failure_data_for_node("raw_pairs").error)
    assert not project.storage.asset_dir("raw_pairs").exists()


def test_wrong_types_in_params_name_the_field_path(project):
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["raw_pairs"]["shard_size"] = "big"
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))
    result = materialize(project)
    error = str(result.failure_data_for_node("raw_pairs").error)
    assert "raw_pairs.shard_size: expected an integer, got 'big'" in error
