"""The Dagster code location: `dagster dev` and `dagster asset materialize` load this module."""

import os

import dagster as dg

from dalle3_dag import ablation, captioner, data, evaluation, schedules, text_to_image
from dalle3_dag.config import CHECKS, CheckFloors
from dalle3_dag.launch import LAUNCH, LaunchConfig
from dalle3_dag.project import S3_URI_ENV, validate_params
from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource
from dalle3_dag.versioning import fail_dead_runs
from ml.stages import (
    ablation_model,
    ablation_report,
    clip_encoder,
    clip_s_eval,
    diffusion_model,
    distilled_model,
    image_autoencoder,
    mixed_training_set,
    prompt_upsampler,
    raw_pairs,
    recaptioned_dataset,
)
from ml.stages import (
    captioner as captioners,
)
from ml.upsampler.config import UPSAMPLER_CHAT, ChatConfig

GROUPS = [data, captioner, text_to_image, evaluation, ablation]
STAGES = [
    raw_pairs.STAGE,
    clip_encoder.STAGE,
    captioners.BASE,
    captioners.SSC,
    captioners.DSC,
    recaptioned_dataset.STAGE,
    mixed_training_set.STAGE,
    image_autoencoder.STAGE,
    diffusion_model.STAGE,
    distilled_model.STAGE,
    prompt_upsampler.STAGE,
    clip_s_eval.STAGE,
    ablation_model.STAGE,
    ablation_report.STAGE,
]
# Every section of params.yaml and the config it builds.
PARAMS = {stage.name: stage.config for stage in STAGES} | {
    CHECKS: CheckFloors,
    UPSAMPLER_CHAT: ChatConfig,  # inference only: `dalle3 generate --upsampler openai`
    LAUNCH: LaunchConfig,  # how the trainers' processes are laid out, not what they train
}
# A bad params file fails the code location's load, so no run starts work on it.
validate_params(PARAMS)
# A run killed mid-step holds its pool slot until marked failed: free it before this process
# (the CLI, or a run worker) claims one. Tests and in-process runs have no DAGSTER_HOME.
if os.path.isdir(os.environ.get("DAGSTER_HOME", "")):
    with dg.DagsterInstance.get() as _instance:
        fail_dead_runs(_instance)

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(GROUPS),
    asset_checks=dg.load_asset_checks_from_modules(GROUPS),
    jobs=[data.observe_sources, schedules.rebuild, ablation.ablation],
    schedules=[schedules.nightly_rebuild],
    sensors=[schedules.new_raw_shards],
    resources={
        # S3 (optional) from the environment; credentials are boto3's: env or ~/.aws
        "storage": StorageResource(s3_uri=os.environ.get(S3_URI_ENV)),
        "mlflow_tracker": MlflowResource(),
        "dvc": DvcResource(),
    },
)
