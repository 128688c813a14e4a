"""The Dagster code location: `dagster dev` and `dagster asset materialize` load this module."""

import dagster as dg

from dalle3_dag import blend, captions, diffusion, raw_pairs
from dalle3_dag.config import CHECKS, CheckFloors
from dalle3_dag.project import TRAINING_TAGS, validate_params
from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource
from ml.captioner.stages import CaptionerStageConfig
from ml.clip import ClipConfig
from ml.data.mixed import BlendConfig
from ml.data.raw_pairs import RawPairsConfig
from ml.data.recaption import RecaptionConfig
from ml.diffusion.config import DiffusionConfig
from ml.diffusion.distill import DistillConfig
from ml.eval.oracle import PromptFollowingConfig

STAGES = [raw_pairs, captions, blend, diffusion]
# Every section of params.yaml and the config it builds.
PARAMS = {
    "raw_pairs": RawPairsConfig,
    "clip_encoder": ClipConfig,
    "captioner_base": CaptionerStageConfig,
    "captioner_ssc": CaptionerStageConfig,
    "captioner_dsc": CaptionerStageConfig,
    "recaptioned_dataset": RecaptionConfig,
    "mixed_training_set": BlendConfig,
    "diffusion_model": DiffusionConfig,
    "distilled_model": DistillConfig,
    "prompt_following": PromptFollowingConfig,
    CHECKS: CheckFloors,
}
# A bad params file fails the code location's load, so no run starts work on it.
validate_params(PARAMS)

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(STAGES),
    asset_checks=dg.load_asset_checks_from_modules(STAGES),
    jobs=[raw_pairs.observe_sources],
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
