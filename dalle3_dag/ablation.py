"""The caption ablations (the paper's Figures 4 and 5): `ablation_model`, one partition per
variant and seed, and `ablation_report` (group eval), and the `ablation` job that trains them.

Each partition is a run of its own that holds the accelerator pool, so a backfill trains as
many variants side by side as the pool has slots (one per GPU) and one at a time on a laptop.
`make ablation` runs the lot; `make run` leaves them out (`PRODUCTION`).
"""

import dagster as dg

from dalle3_dag.automation import EAGER
from dalle3_dag.factory import stage_asset
from dalle3_dag.project import resolve
from ml.eval.ablation import AblationConfig, partition_keys
from ml.stages import ablation_model as trainer
from ml.stages import ablation_report as report

VARIANT_SEEDS = dg.StaticPartitionsDefinition(
    partition_keys(resolve(AblationConfig, trainer.STAGE.name)[0])
)

ablation_model = stage_asset(
    trainer.STAGE,
    module=__name__,
    group="ablation",
    kinds={"diffusers"},
    partitions_def=VARIANT_SEEDS,
    backfill_policy=dg.BackfillPolicy.multi_run(1),
    on_demand=True,  # hours of training: launched by `make ablation` or the `ablation` job
    input_partitions={"recaptioned_dataset": dg.AllPartitionMapping()},  # every shard's captions
    description=(
        "The caption ablations' text-to-image models: per variant (alt-text only, 95% short "
        "synthetic, 65-95% descriptive synthetic) and seed, the same model trained on that "
        "blend, its EMA pipeline kept and scored (CLIP-S on both caption sets, the oracle per "
        "category) at evenly spaced steps."
    ),
)

ablation_report = stage_asset(
    report.STAGE,
    module=__name__,
    group="eval",
    plots={f"{name}.png": {} for name in ("figure4", "figure5", "oracle")},
    automation=EAGER,
    description=(
        "The caption ablations' results: every variant and step with seeds pooled and 95% "
        "intervals, the paper's findings checked against them, Figures 4 and 5 and the oracle's "
        "per-category bars."
    ),
)

ablation = dg.define_asset_job(
    "ablation",
    selection=dg.AssetSelection.assets(ablation_model),
    partitions_def=VARIANT_SEEDS,
    description=(
        "Train every ablation variant: launch a backfill of all partitions; `ablation_report` "
        "follows on its own (eager) or with `make ablation`."
    ),
)

ABLATION = dg.AssetSelection.assets(ablation_model, ablation_report)
PRODUCTION = dg.AssetSelection.all() - ABLATION
