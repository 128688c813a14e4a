"""`distilled_model`: the diffusion model consistency-distilled (LCM) into a 2-step student.

Same layout and pipeline class as the teacher, guidance built in; scored on the teacher's
prompts and seeds, so the teacher's figures (read from its folder) compare with its own.

    python -m ml.stages.distilled_model --config c.yaml --out DIR [--assets assets]
"""

import json
from dataclasses import asdict
from pathlib import Path

from ml.diffusion.config import DistillConfig
from ml.stage import CONFIG_FILE, Inputs, Log, Stage, StageResult, main, read_metrics
from ml.stages.diffusion_model import GRID, MANIFEST, device

COMPARED = ("color_accuracy", "position_accuracy", "two_object_accuracy")


def run(cfg: DistillConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    from PIL import Image

    from ml.data.mixed import MixManifest
    from ml.data.mixed_dataset import MixedDataset
    from ml.diffusion.distill import distill
    from ml.diffusion.pipeline import TextToImagePipeline
    from ml.eval.oracle import score_text_to_image
    from ml.viz import image_grid

    teacher_dir = inputs["diffusion_model"]
    if not (teacher_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"no diffusion model at {teacher_dir}")
    taught = json.loads((teacher_dir / CONFIG_FILE).read_text())["eval"]
    ours = asdict(cfg.eval)
    if {**taught, "sampling_steps": 0} != {**ours, "sampling_steps": 0}:
        raise ValueError(
            f"distilled_model.eval must score the teacher's prompts the teacher's way (all but "
            f"sampling_steps equal): {ours} != diffusion_model.eval {taught}"
        )
    teacher = TextToImagePipeline.from_pretrained(teacher_dir).to(device())
    dataset = MixedDataset(MixManifest.load(inputs["mixed_training_set"] / MANIFEST))
    log.info(f"distilled_model: {cfg.train.steps} steps of {cfg.train.batch_size} images")
    student, result = distill(teacher, cfg, dataset, log, inputs.checkpoints(cfg), inputs.resume)
    student.save_pretrained(out)
    scores, grid = score_text_to_image(
        TextToImagePipeline.from_pretrained(out).to(device()), cfg.eval
    )
    grid.save(out / GRID)
    teacher_scores = read_metrics(teacher_dir)
    scores |= {f"teacher_{name}": teacher_scores[name] for name in COMPARED}
    # Teacher above student: the same prompts and seeds.
    both = image_grid([Image.open(teacher_dir / GRID), grid], cols=1, pad=0)
    return StageResult(
        metrics=scores,
        speed={
            "distill_images_per_s": result.samples_per_s,
            "checkpoint_share": result.checkpoint_share,
        },
        metadata={
            "steps": result.steps,
            "resumed_from_step": result.resumed_from,
            "distill_seconds": round(result.seconds, 1),
            "sampling_steps": cfg.eval.sampling_steps,
        },
        images={"teacher_vs_student": both},
        curves={"loss": result.curve},
        register=True,
    )


STAGE = Stage(
    "distilled_model", DistillConfig, ("diffusion_model", "mixed_training_set"), run, trains=True
)

if __name__ == "__main__":
    main([STAGE])
