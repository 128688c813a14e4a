"""The automation a team leaves running, evaluated in-process with Dagster's test utilities:
the new-shards sensor, the nightly rebuild schedule, the eager and weekly-retrain conditions,
and retries that only a transient failure gets."""

import datetime

import dagster as dg
import pytest
import yaml
from conftest import web_source, write_web_shards

from dalle3_dag import retries
from dalle3_dag.definitions import defs
from dalle3_dag.schedules import new_raw_shards, nightly_rebuild
from ml.stages import raw_pairs

SATURDAY = datetime.datetime(2026, 12, 5, 12, tzinfo=datetime.UTC)
SUNDAY = datetime.datetime(2026, 12, 6, 3, 30, tzinfo=datetime.UTC)  # after the weekly tick
# The trainers that read raw_pairs and each other only, none of the shard partitions.
FIRST_TRAINERS = [
    "clip_encoder", "captioner_base", "captioner_ssc", "captioner_dsc", "image_autoencoder"
]  # fmt: skip


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:  # schedules need a persistent instance
        yield instance


def materialize(project, instance, select, **kwargs) -> dg.ExecuteInProcessResult:
    assets = [*defs.assets, *defs.asset_checks]
    return dg.materialize(
        assets, selection=select, resources=project.resources, instance=instance, **kwargs
    )


def use_web_source(project, folder) -> None:
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["raw_pairs"] |= web_source(folder)
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))


def sense(project, instance) -> dg.SensorResult | dg.SkipReason:
    context = dg.build_sensor_context(instance=instance, resources=project.resources)
    result = new_raw_shards(context)
    if isinstance(result, dg.SensorResult):  # what the daemon does with the observation
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
    return result


def nightly(instance) -> list[str]:
    repository = defs.get_repository_def()
    with dg.build_schedule_context(instance=instance, repository_def=repository) as context:
        request = nightly_rebuild(context)
    if isinstance(request, dg.SkipReason):
        return []
    return sorted(key.to_user_string() for key in request.asset_selection)


def requested(result: dg.EvaluateAutomationConditionsResult) -> set[str]:
    keys = defs.resolve_asset_graph().materializable_asset_keys
    return {key.to_user_string() for key in keys if result.get_num_requested(key)}


def test_new_shards_at_the_source_rebuild_raw_pairs(project, instance, tmp_path):
    source = tmp_path / "incoming"
    write_web_shards(source, 60, shard_size=20)
    use_web_source(project, source)

    first = sense(project, instance)
    (request,) = first.run_requests
    assert request.asset_selection == [dg.AssetKey("raw_pairs")]
    assert materialize(project, instance, ["raw_pairs"]).success
    assert isinstance(sense(project, instance), dg.SkipReason)  # nothing new: no run
    assert "raw_pairs" not in nightly(instance)

    write_web_shards(source / "more", 20, shard_size=20, seed=8)
    (source / "more" / "00000.tar").rename(source / "00009.tar")
    (again,) = sense(project, instance).run_requests
    assert again.run_key != request.run_key
    assert "raw_pairs" in nightly(instance)  # the UI shows it stale too


def test_nightly_rebuild_stops_where_shard_partitions_must_run_first(project, instance):
    """On a fresh instance everything is missing: one run takes what precedes the shard
    partitions; once those exist and are fresh it takes the rest."""
    assert nightly(instance) == sorted(["raw_pairs", *FIRST_TRAINERS])
    assert materialize(project, instance, ["raw_pairs", *FIRST_TRAINERS]).success
    assert nightly(instance) == []  # recaptioned_dataset's partitions come first
    shards = instance.get_dynamic_partitions("raw_pairs_shards")
    for shard in shards:
        assert materialize(project, instance, ["recaptioned_dataset"], partition_key=shard).success
    assert nightly(instance) == sorted([
        "mixed_training_set", "diffusion_model", "distilled_model", "prompt_upsampler",
        "clip_s_eval",
    ])


def test_trainers_wait_for_the_weekly_tick_and_data_follows_eagerly(project, instance):
    assert materialize(project, instance, ["raw_pairs"]).success
    saturday = dg.evaluate_automation_conditions(defs, instance, evaluation_time=SATURDAY)
    assert requested(saturday) == set()  # no tick yet: no trainer starts on its own

    sunday = dg.evaluate_automation_conditions(
        defs, instance, evaluation_time=SUNDAY, cursor=saturday.cursor
    )
    # after the tick the trainers whose inputs exist, or are requested with them, start (one
    # run, in graph order); those downstream of the missing shard partitions wait
    assert requested(sunday) == set(FIRST_TRAINERS)

    assert materialize(project, instance, FIRST_TRAINERS).success
    later = dg.evaluate_automation_conditions(
        defs, instance, evaluation_time=SUNDAY + datetime.timedelta(hours=1), cursor=sunday.cursor
    )
    shards = set(instance.get_dynamic_partitions("raw_pairs_shards"))
    assert later.get_requested_partitions(dg.AssetKey("recaptioned_dataset")) == shards


def test_transient_failures_are_retried_and_others_are_not(project, instance, monkeypatch):
    monkeypatch.setattr(retries, "BACKOFF_S", 0.0)
    real, calls = raw_pairs.build_raw_pairs, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("connection reset by the S3 server")
        return real(*args, **kwargs)

    monkeypatch.setattr(raw_pairs, "build_raw_pairs", flaky)
    result = materialize(project, instance, ["raw_pairs"])
    assert result.success and len(calls) == 2
    retried = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert len(retried) == 1

    def broken(*args, **kwargs):
        calls.append(1)
        raise ValueError("a bug, not a hiccup")

    monkeypatch.setattr(raw_pairs, "build_raw_pairs", broken)
    calls.clear()
    failed = materialize(project, instance, ["raw_pairs"], raise_on_error=False)
    assert not failed.success and len(calls) == 1


def test_transient_errors_are_told_apart():
    import botocore.exceptions
    import requests

    def wrapped(cause: BaseException) -> Exception:
        """An error raised while handling `cause`, as MLflow wraps a requests error."""
        try:
            try:
                raise cause
            except BaseException:
                raise RuntimeError("API request to http://127.0.0.1:5000 failed")  # noqa: B904
        except RuntimeError as err:
            return err

    slow = botocore.exceptions.ClientError({"Error": {"Code": "SlowDown"}}, "PutObject")
    denied = botocore.exceptions.ClientError({"Error": {"Code": "AccessDenied"}}, "PutObject")
    assert retries.is_transient(wrapped(requests.exceptions.ConnectionError("refused")))
    assert retries.is_transient(slow)
    assert not retries.is_transient(denied)
    assert not retries.is_transient(wrapped(ValueError("bad value")))
    assert not retries.is_transient(dg.Failure("blocking check(s) failed"))
