"""The text_to_image group: `diffusion_model` (T5 + U-Net), `distilled_model` (2-step) and
`prompt_upsampler` (short prompts -> descriptive ones).

The two image models are scored on prompt following the same way (`ml.eval.oracle`):
single-object prompts, the generated object's colour and position against the prompt's; the
upsampler on what its rewrites of the held-out prompts keep of them.
"""

from dalle3_dag.config import CHECKS, CheckFloors, metrics_check
from dalle3_dag.factory import stage_asset
from ml.stages import diffusion_model as teacher
from ml.stages import distilled_model as student
from ml.stages import prompt_upsampler as upsampler

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


@metrics_check(
    "Rewritten by the upsampler, the held-out prompts still ask for all they asked (read from "
    "the text by the oracle's rule, mean over categories) at least `checks.upsampler_kept`; "
    "blocking: an upsampler that contradicts its users must not go live.",
    needs="kept_overall_accuracy",
    unmeasured="raw_pairs has no held-out prompts (a webdataset source)",
    blocking=True,
)
def prompt_upsampler_keeps_prompts(metrics: dict[str, float], floor: CheckFloors) -> bool:
    return metrics["kept_overall_accuracy"] >= floor.upsampler_kept


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
prompt_upsampler = stage_asset(
    upsampler.STAGE,
    module=__name__,
    group="text_to_image",
    kinds={"transformers"},
    checks=[prompt_upsampler_keeps_prompts],
    params=[CHECKS],
    description=(
        "A small T5 that rewrites short prompts as descriptive captions (DALL·E 3 section 3.5), "
        "trained on labelled short captions, user-style prompts and checked alt-text; "
        "`ml.upsampler.load_upsampler(dir)`, or `T5ForConditionalGeneration.from_pretrained`; "
        "registered in MLflow. `dalle3 generate --upsample` uses it (or an OpenAI-compatible "
        "endpoint with `--upsampler openai`)."
    ),
)
