"""The text_to_image group: `diffusion_model` (T5 + U-Net) and `distilled_model` (2-step).

Both are scored on prompt following the same way (`ml.eval.oracle`): single-object prompts,
the generated object's colour and position against the prompt's.
"""

from dalle3_dag.config import CheckFloors, metrics_check
from dalle3_dag.factory import stage_asset
from ml.stages import diffusion_model as teacher
from ml.stages import distilled_model as student

KINDS = {"diffusers"}


@metrics_check(
    "Single-object prompts: the generated object's colour and position match the prompt at "
    "least `checks.prompt_following_over_chance` times as often as chance."
)
def diffusion_model_follows_prompts(metrics: dict[str, float], floor: CheckFloors) -> bool:
    ratio = floor.prompt_following_over_chance
    return all(
        metrics[f"{what}_accuracy"] >= ratio * metrics[f"{what}_chance"]
        for what in ("color", "position")
    )


@metrics_check(
    "The 2-step student's colour and position accuracy are each within "
    "`checks.student_max_gap` of the teacher's."
)
def distilled_model_keeps_up(metrics: dict[str, float], floor: CheckFloors) -> bool:
    gap = floor.student_max_gap
    return all(metrics[f"teacher_{name}"] - metrics[name] <= gap for name in student.COMPARED)


diffusion_model = stage_asset(
    teacher.STAGE,
    module=__name__,
    group="text_to_image",
    kinds=KINDS,
    checks=[diffusion_model_follows_prompts],
    description=(
        "The T5-conditioned U-Net diffusion model trained on the blended training set "
        "(accelerate loop, CFG caption dropout, EMA, resumable checkpoints), saved in diffusers "
        "layout with its EMA weights; scored on single-object prompt following."
    ),
)
distilled_model = stage_asset(
    student.STAGE,
    module=__name__,
    group="text_to_image",
    kinds=KINDS,
    checks=[distilled_model_keeps_up],
    description=(
        "The diffusion model consistency-distilled (LCM) into a student that samples in 2 "
        "steps with guidance built in; same layout and pipeline class as the teacher."
    ),
)
