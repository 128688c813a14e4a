"""The eval group: `clip_s_eval`, the paper's CLIP-S and GenEval-style prompt following of the
teacher and its 2-step student."""

from dalle3_dag.automation import EAGER
from dalle3_dag.config import CHECKS, CheckFloors, metrics_check
from dalle3_dag.factory import stage_asset
from ml.stages import clip_s_eval as evaluation

NO_PROMPTS = "raw_pairs has no held-out prompts (a webdataset source)"


@metrics_check(
    "Asked in the descriptive style, the teacher's images follow the held-out prompts (GenEval's "
    "overall score: the mean of the categories) at least `checks.eval_prompt_following`.",
    needs="teacher_descriptive_overall_accuracy",
    unmeasured=NO_PROMPTS,
)
def clip_s_eval_prompt_following(metrics: dict[str, float], floor: CheckFloors) -> bool:
    return metrics["teacher_descriptive_overall_accuracy"] >= floor.eval_prompt_following


@metrics_check(
    "The teacher's images of the eval split's descriptive captions score a CLIP-S (the paper's "
    "variant) of at least `checks.eval_clip_s`."
)
def clip_s_eval_clip_s(metrics: dict[str, float], floor: CheckFloors) -> bool:
    return metrics["teacher_clip_s_paper_descriptive"] >= floor.eval_clip_s


@metrics_check(
    "Rewritten by the prompt upsampler, the held-out short prompts make the teacher follow them "
    "(GenEval overall) at least `checks.upsampled_share` as well as the ground truth's "
    "descriptive captions of the same scenes do (the paper: upsampling is what lets users "
    "write short prompts).",
    needs="teacher_upsampled_overall_accuracy",
    unmeasured=NO_PROMPTS,
)
def clip_s_eval_upsampling_keeps_up(metrics: dict[str, float], floor: CheckFloors) -> bool:
    descriptive = metrics["teacher_descriptive_overall_accuracy"]
    return metrics["teacher_upsampled_overall_accuracy"] >= floor.upsampled_share * descriptive


clip_s_eval = stage_asset(
    evaluation.STAGE,
    module=__name__,
    group="eval",
    kinds={"diffusers"},
    checks=[clip_s_eval_prompt_following, clip_s_eval_clip_s, clip_s_eval_upsampling_keeps_up],
    params=[CHECKS],
    dvc_metrics=True,
    plots={"prompt_following": {"x": "accuracy", "y": "case", "template": "bar_horizontal"}},
    automation=EAGER,
    description=(
        "CLIP-S (the paper's and Hessel's) of the teacher and the 2-step student on the eval "
        "split's alt-text and descriptive captions, and GenEval-style prompt following per "
        "category with 95% intervals, asked as written, as descriptive captions and as the "
        "prompt upsampler rewrites them."
    ),
)
