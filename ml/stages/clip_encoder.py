"""`clip_encoder`: the CLIP behind the captioner's F(i) and behind CLIP-S.

A pretrained open_clip checkpoint from a local path, or (toy) a small CLIP trained
contrastively on the held-out `clip` split; saved in open_clip's local-dir layout and scored
on the `eval` split, loaded the way users load it.

    python -m ml.stages.clip_encoder --config c.yaml --out DIR [--assets assets]
"""

from pathlib import Path

from ml.clip_config import ClipConfig
from ml.stage import Inputs, Log, Stage, StageResult, main


def run(cfg: ClipConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    from ml.clip import load_clip, save_clip, train_toy_clip
    from ml.data.raw_pairs import load_split
    from ml.data.shapeworld import scene_of
    from ml.eval.clip_scores import pairwise_preference, retrieval_recall

    raw = inputs["raw_pairs"]
    if cfg.source == "toy":
        samples = load_split(raw, "clip")
        log.info(f"clip_encoder: {cfg.train.steps} steps on {len(samples)} clip-split samples")
        model, trained = train_toy_clip(
            samples, cfg, log, inputs.checkpoints(cfg), inputs.resume
        )
        curves = {"loss": trained.curve}
    else:
        model, _, _ = load_clip(cfg)
        curves = {"loss": []}  # pretrained here: no curve
    save_clip(model, cfg, out)
    model, preprocess, tokenizer = load_clip(out)
    held_out = load_split(raw, "eval")
    recall = retrieval_recall(model, preprocess, tokenizer, held_out)
    # MLflow metric names take no '@'
    metrics = {name.replace("@", "_at_"): value for name, value in recall.items()}
    if all(scene_of(s) for s in held_out):  # attribute binding needs scene graphs
        for attribute in ("color", "shape"):
            metrics[f"{attribute}_preference"] = pairwise_preference(
                model, preprocess, tokenizer, held_out, attribute
            )
    return StageResult(
        metrics,
        metadata={"source": cfg.source, "held_out_samples": len(held_out)},
        curves=curves,
    )


STAGE = Stage("clip_encoder", ClipConfig, ("raw_pairs",), run, trains=True)

if __name__ == "__main__":
    main([STAGE])
