"""The text_to_image group: `image_autoencoder` (the VAE of latent diffusion), `diffusion_model`
(T5 + U-Net) and `distilled_model` (2-step).

The two text-to-image models are scored on prompt following the same way (`ml.eval.oracle`):
single-object prompts, the generated object's colour and position against the prompt's.
"""

from dalle3_dag.config import CHECKS, CheckFloors, metrics_check
from dalle3_dag.factory import stage_asset
from ml.stages import diffusion_model as teacher
from ml.stages import distilled_model as student
from ml.stages import image_autoencoder as autoencoder

KINDS = {"diffusers"}


@metrics_check(
    "Reconstructions of held-out eval images reach a PSNR of `checks.autoencoder_psnr` dB. "
    "Blocking: the text-to-image model draws through this autoencoder.",
    blocking=True,
)
def image_autoencoder_reconstructs(metrics: dict[str, float], floor: CheckFloors) -> bool:
    return metrics["psnr"] >= floor.autoencoder_psnr


@metrics_check(
    "The prompt-following oracle reads reconstructions of the held-out prompts' target scenes "
    "as it reads the scenes: GenEval's overall score at least `checks.autoencoder_oracle`. "
    "Blocking: what the autoencoder loses, no model drawing through it gets back.",
    needs="oracle_overall_accuracy",
    unmeasured="raw_pairs has no held-out prompts (a webdataset source)",
    blocking=True,
)
def image_autoencoder_keeps_scenes(metrics: dict[str, float], floor: CheckFloors) -> bool:
    return metrics["oracle_overall_accuracy"] >= floor.autoencoder_oracle


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


image_autoencoder = stage_asset(
    autoencoder.STAGE,
    module=__name__,
    group="text_to_image",
    kinds=KINDS,
    checks=[image_autoencoder_reconstructs, image_autoencoder_keeps_scenes],
    # The blocking checks' floors decide what goes live, so they are the stage's params too.
    params=[CHECKS],
    description=(
        "diffusers' AutoencoderKL whose latents the text-to-image model denoises: (toy) trained "
        "on raw_pairs' training renders, or a pretrained one (SD's VAE) from a local path; "
        "scored by reconstruction PSNR and the oracle on reconstructed held-out scenes."
    ),
)
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
