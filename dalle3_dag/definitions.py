"""The Dagster code location: `dagster dev` and `dagster asset materialize` load this module."""

import dagster as dg

from dalle3_dag import blend, captions, diffusion, raw_pairs
from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource

STAGES = [raw_pairs, captions, blend, diffusion]

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(STAGES),
    asset_checks=dg.load_asset_checks_from_modules(STAGES),
    resources={
        "storage": StorageResource(),
        "mlflow_tracker": MlflowResource(),
        "dvc": DvcResource(),
    },
)
