"""The schedule and sensor a team leaves running (`make ui` starts the daemon; both start
stopped, switched on in the UI or with `dagster schedule start` / `dagster sensor start`)."""

import dagster as dg

from dalle3_dag import data
from dalle3_dag.ablation import PRODUCTION
from dalle3_dag.automation import NIGHTLY
from dalle3_dag.project import resolve
from dalle3_dag.rebuild import one_run
from dalle3_dag.resources import StorageResource
from ml.data.raw_pairs import RawPairsConfig, source_fingerprint
from ml.stages import raw_pairs as raw

DATA_VERSION_TAG = "dagster/data_version"
SOURCE_KEY = dg.AssetKey(data.SOURCE)

# Every pipeline asset one run can hold: the shard-partitioned one runs in runs of its own,
# and the ablations are an experiment of their own (the `ablation` job).
rebuild = dg.define_asset_job(
    "rebuild",
    selection=PRODUCTION - dg.AssetSelection.assets(data.recaptioned_dataset),
    description="The unpartitioned assets; the nightly schedule runs the outdated ones.",
)


@dg.schedule(job=rebuild, cron_schedule=NIGHTLY, name="nightly_rebuild")
def nightly_rebuild(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    """Rebuild what is missing or stale, and what is downstream of it, as `make run` would."""
    graph = context.repository_def.asset_graph
    keys = one_run(context.instance, graph, PRODUCTION.resolve(graph))
    if not keys:
        return dg.SkipReason("every asset is up to date")
    return dg.RunRequest(asset_selection=keys)


@dg.sensor(
    name="new_raw_shards",
    asset_selection=[data.raw_pairs],
    minimum_interval_seconds=300,
)
def new_raw_shards(
    context: dg.SensorEvaluationContext, storage: StorageResource
) -> dg.SensorResult | dg.SkipReason:
    """New or rewritten shards at the raw source (a folder or s3:// prefix): record the
    source's new version and rebuild raw_pairs, whose new training shards become
    recaptioned_dataset partitions that eager automation then recaptions."""
    cfg, _ = resolve(RawPairsConfig, raw.STAGE.name)
    s3 = storage.s3_client() if cfg.uri.startswith("s3://") else None
    version = source_fingerprint(cfg, s3)
    record = context.instance.get_latest_data_version_record(SOURCE_KEY, is_source=True)
    seen = record.asset_observation.tags.get(DATA_VERSION_TAG) if record else None
    if version == seen:
        return dg.SkipReason(f"no new shards at {cfg.uri or cfg.source}")
    return dg.SensorResult(
        asset_events=[dg.AssetObservation(SOURCE_KEY, tags={DATA_VERSION_TAG: version})],
        run_requests=[dg.RunRequest(run_key=version, asset_selection=[dg.AssetKey("raw_pairs")])],
    )
