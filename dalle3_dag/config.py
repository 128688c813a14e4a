"""The check floors every asset check reads (params.yaml's `checks` section), and the one
shape of a check that holds a version's held-out metrics to them."""

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import dagster as dg

from dalle3_dag.project import resolve
from dalle3_dag.versioning import FolderCheck
from ml.stage import read_metrics

CHECKS = "checks"


@dataclass
class CheckFloors:
    """params.yaml's `checks` section: the floors the asset checks hold each version to."""

    clip_color_preference: float = 0.8
    clip_recall_over_chance: float = 2.0  # recall@5 / chance@5 on the eval split
    ssc_main_object_accuracy: float = 0.60
    dsc_attribute_recall: float = 0.8
    dsc_attribute_precision: float = 0.85
    autoencoder_psnr: float = 28.0  # dB on held-out renders
    autoencoder_oracle: float = 0.85  # the oracle's GenEval overall on reconstructed targets
    prompt_color: float = 0.30  # the teacher's single-object colour accuracy
    prompt_position: float = 0.05  # its single-object position accuracy
    prompt_two_object: float = 0.0  # its two-object prompts with both objects drawn
    student_max_gap: float = 0.10  # how far the 2-step student may trail the teacher
    eval_prompt_following: float = 0.03  # the teacher's GenEval overall, descriptive prompts
    eval_clip_s: float = 30.0  # the teacher's CLIP-S (paper's variant), descriptive captions
    upsampler_kept: float = 0.75  # held-out prompts whose rewrite keeps all they ask (mean)
    upsampled_share: float = 0.9  # upsampled prompts' GenEval overall / descriptive prompts'


def floors() -> CheckFloors:
    return resolve(CheckFloors, CHECKS)[0]


def not_measured(reason: str, metrics: dict[str, float]) -> dg.AssetCheckResult:
    """A check that has no ground truth on this data: a warning, never a pass."""
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"not_measured": reason, **metrics},
    )


Rule = Callable[[dict[str, float], CheckFloors], bool]


def metrics_check(
    description: str, needs: str = "", unmeasured: str = "", blocking: bool = False
) -> Callable[[Rule], FolderCheck]:
    """Declare a check, named after its rule, of the staged version's `metrics.json` against
    the floors; a version without the metric `needs` had no ground truth: `not_measured`."""

    def declare(rule: Rule) -> FolderCheck:
        def evaluate(folder: Path) -> dg.AssetCheckResult:
            metrics = read_metrics(folder)
            if needs and needs not in metrics:
                return not_measured(unmeasured, metrics)
            floor = floors()
            return dg.AssetCheckResult(
                passed=rule(metrics, floor), metadata={**metrics, **asdict(floor)}
            )

        return FolderCheck(rule.__name__, evaluate, description, blocking)

    return declare
