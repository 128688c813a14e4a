"""The text_to_image group: `image_autoencoder` (the VAE of latent diffusion),
`diffusion_model` (T5 + U-Net on its latents), `distilled_model` (2-step) and
`prompt_upsampler` (short prompts -> descriptive ones).

The two image models are scored on prompt following the same way (`ml.eval.oracle`):
single-object prompts, the generated object's colour and position against the prompt's, and
two-object prompts; the upsampler on what its rewrites of the held-out prompts keep of them.
"""

from dalle3_dag.config import CHECKS, CheckFloors, metrics_check
from dalle3_dag.factory import stage_asset
from ml.stages import diffusion_model as teacher
from ml.stages import distilled_model as student
from ml.stages import image_autoencoder as autoencoder
from ml.stages import prompt_upsampler as upsampler

KINDS = {"diffusers"}


@metrics_check(
    "Reconstructions of held-out renders reach `checks.autoencoder_psnr` dB, and the oracle "
    "reads at least `checks.autoencoder_oracle` (GenEval overall) of the held-out prompts' "
    "target scenes right through the autoencoder. Blocking: no text-to-image model drawn "
    "through it can get back what it loses.",
    needs="oracle_overall_accuracy",
    unmeasured="raw_pairs has no held-out prompts (a webdataset source)",
    blocking=True,
)
def image_autoencoder_reconstructs(metrics: dict[str, float], floor: CheckFloors) -> bool:
    return (
        metrics["psnr"] >= floor.autoencoder_psnr
        and metrics["oracle_overall_accuracy"] >= floor.autoencoder_oracle
    )


@metrics_check(
    "Held-out prompts in the descriptive style: the single-object colour and position "
    "accuracies reach `checks.prompt_color` and `checks.prompt_position`, and two-object "
    "prompts get both objects drawn at least `checks.prompt_two_object` of the time."
)
def diffusion_model_follows_prompts(metrics: dict[str, float], floor: CheckFloors) -> bool:
    return (
        metrics["color_accuracy"] >= floor.prompt_color
        and metrics["position_accuracy"] >= floor.prompt_position
        and metrics["two_object_accuracy"] >= floor.prompt_two_object
    )


@metrics_check(
    "The 2-step student's colour, position and two-object accuracies are each within "
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


image_autoencoder = stage_asset(
    autoencoder.STAGE,
    module=__name__,
    group="text_to_image",
    kinds=KINDS,
    checks=[image_autoencoder_reconstructs],
    params=[CHECKS],
    description=(
        "The image autoencoder of latent diffusion (diffusers `AutoencoderKL`): trained on "
        "raw_pairs' train renders (toy), or a pretrained one (SD's VAE) from a local folder; "
        "`AutoencoderKL.from_pretrained('assets/image_autoencoder')`. Scored by PSNR and by the "
        "oracle on reconstructed held-out scenes."
    ),
)
diffusion_model = stage_asset(
    teacher.STAGE,
    module=__name__,
    group="text_to_image",
    kinds=KINDS,
    checks=[diffusion_model_follows_prompts],
    description=(
        "The T5-conditioned U-Net diffusion model trained on the blended training set in the "
        "image autoencoder's latent space (accelerate loop, CFG caption dropout, EMA, resumable "
        "checkpoints), saved in diffusers layout with its EMA weights and the autoencoder as "
        "`vae/`; scored on single- and two-object prompt following."
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
