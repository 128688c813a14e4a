"""The captioner group: `clip_encoder` and the three captioners, with their checks."""

from dalle3_dag.config import CHECKS, CheckFloors, metrics_check
from dalle3_dag.factory import stage_asset
from ml.stages import captioner, clip_encoder

KINDS = {"transformers"}
NO_SCENES = "raw_pairs/eval has no scene graphs to score against"


@metrics_check(
    "The CLIP ranks an image's own descriptive caption above that of the same scene with one "
    "object recoloured, for at least `checks.clip_color_preference` of held-out images, and "
    "retrieves captions at least `checks.clip_recall_over_chance` times as often as chance. "
    "Blocking: every later stage reads images through this CLIP.",
    needs="color_preference",
    unmeasured="raw_pairs/eval has no scene graphs to recolour",
    blocking=True,
)
def clip_encoder_binds_attributes(metrics: dict[str, float], floor: CheckFloors) -> bool:
    return (
        metrics["color_preference"] >= floor.clip_color_preference
        and metrics["recall_at_5"] >= floor.clip_recall_over_chance * metrics["chance_at_5"]
    )


clip_encoder_asset = stage_asset(
    clip_encoder.STAGE,
    module=__name__,
    group="captioner",
    checks=[clip_encoder_binds_attributes],
    # The blocking check's floors decide what goes live, so they are the stage's params too.
    params=[CHECKS],
    description=(
        "The CLIP behind the captioner's F(i) and CLIP-S, in open_clip's local-dir layout: a "
        "pretrained open_clip checkpoint from a local path, or (toy) a small CLIP trained "
        "contrastively on the held-out `clip` split's descriptive captions."
    ),
)


@metrics_check(
    "Descriptive captions state ShapeWorld's ground-truth attributes: recall and precision "
    "on held-out images at least `checks.dsc_attribute_recall` / `dsc_attribute_precision`.",
    needs="attribute_recall",
    unmeasured=NO_SCENES,
)
def captioner_dsc_attributes(metrics: dict[str, float], floor: CheckFloors) -> bool:
    return (
        metrics["attribute_recall"] >= floor.dsc_attribute_recall
        and metrics["attribute_precision"] >= floor.dsc_attribute_precision
    )


@metrics_check(
    "Short captions name the main object correctly for at least "
    "`checks.ssc_main_object_accuracy` of held-out images.",
    needs="main_object_accuracy",
    unmeasured=NO_SCENES,
)
def captioner_ssc_main_object(metrics: dict[str, float], floor: CheckFloors) -> bool:
    return metrics["main_object_accuracy"] >= floor.ssc_main_object_accuracy


captioner_base = stage_asset(
    captioner.BASE,
    module=__name__,
    group="captioner",
    kinds=KINDS,
    description=(
        "Captioner pretrained on the raw pairs' alt-text: a GPT-2-style LM prefixed with the "
        "frozen CLIP's image features (ClipCap-style prefix, DALL·E 3 §2.1)."
    ),
)
captioner_ssc = stage_asset(
    captioner.SSC,
    module=__name__,
    group="captioner",
    kinds=KINDS,
    checks=[captioner_ssc_main_object],
    description="Captioner fine-tuned from base on short synthetic captions (the main subject).",
)
captioner_dsc = stage_asset(
    captioner.DSC,
    module=__name__,
    group="captioner",
    kinds=KINDS,
    checks=[captioner_dsc_attributes],
    description=(
        "Captioner fine-tuned from base on descriptive synthetic captions: every object with "
        "colour, size and position, the background and any rendered text."
    ),
)
