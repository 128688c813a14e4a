"""The evaluation stage's config: light, so the Dagster code location imports it cheaply."""

from dataclasses import dataclass


@dataclass
class ClipSEvalConfig:
    """How `clip_s_eval` samples the teacher and the student, and how much it scores.

    GenEval draws 4 images per prompt; the prompts are raw_pairs' held-out `prompts.json`
    (`raw_pairs.prompts_per_category` of each category), and CLIP-S takes the first `captions`
    samples of the eval split.
    """

    images_per_prompt: int = 4
    captions: int = 256
    seed: int = 1
    guidance_scale: float = 3.0
    teacher_steps: int = 25
    student_steps: int = 2
    batch_size: int = 64
    grid_prompts: int = 8  # first prompts of each category in the sample grids

    def __post_init__(self) -> None:
        for name in ("images_per_prompt", "captions", "teacher_steps", "student_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClipSEvalConfig.{name} must be at least 1")
