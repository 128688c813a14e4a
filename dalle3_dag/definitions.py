"""The Dagster code location: `dagster dev` and `dagster asset materialize` load this module."""

import dagster as dg

from dalle3_dag import blend, captions, diffusion, raw_pairs
from dalle3_dag.project import TRAINING_TAGS
from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource

STAGES = [raw_pairs, captions, blend, diffusion]

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(STAGES),
    asset_checks=dg.load_asset_checks_from_modules(STAGES),
    # Training steps one at a time, each with every core (see TRAINING_TAGS); checks run beside.
    executor=dg.multiprocess_executor.configured(
        {
            "tag_concurrency_limits": [
                {"key": key, "value": value, "limit": 1} for key, value in TRAINING_TAGS.items()
            ]
        }
    ),
    resources={
        "storage": StorageResource(),
        "mlflow_tracker": MlflowResource(),
        "dvc": DvcResource(),
    },
)
