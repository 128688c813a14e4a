"""`prompt_upsampler`: the local backend of prompt upsampling, trained and scored.

A small T5 learns (alt-text or short caption -> descriptive caption) from raw_pairs' labelled
split and recaptioned_dataset (`ml.upsampler.pairs`), is saved with `save_pretrained` and is
scored on raw_pairs' held-out prompts by what its rewrites keep of each prompt
(`ml.upsampler.evaluate`), with examples of the details it added.

    python -m ml.stages.prompt_upsampler --config c.yaml --out DIR [--assets assets]
"""

import json
from pathlib import Path

from ml.files import write_json
from ml.stage import Inputs, Log, Stage, StageResult, main
from ml.upsampler.config import UpsamplerConfig

UPSAMPLED = "eval_upsampled.json"  # each held-out prompt and its rewrite
EXAMPLES = 14


def run(cfg: UpsamplerConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    from ml.upsampler.evaluate import added_details, score_upsampling
    from ml.upsampler.model import LocalUpsampler, build_model, train_upsampler
    from ml.upsampler.pairs import training_pairs

    raw = inputs["raw_pairs"]
    recaptioned = inputs["recaptioned_dataset"] if "recaptioned" in cfg.sources else None
    pairs, counts = training_pairs(raw, recaptioned, cfg.sources, cfg.min_overlap)
    prompts_file = raw / "prompts.json"
    prompts = json.loads(prompts_file.read_text()) if prompts_file.is_file() else []
    model, tokenizer = build_model(cfg, [text for pair in pairs for text in pair])
    log.info(f"prompt_upsampler: {cfg.train.steps} steps on {len(pairs)} pairs ({counts})")
    trained = train_upsampler(
        model, tokenizer, pairs, cfg, log, inputs.checkpoints(cfg), inputs.resume
    )
    LocalUpsampler(model, tokenizer).save_pretrained(out, cfg.max_new_tokens)

    upsample = LocalUpsampler.from_pretrained(out)  # scored as users load it
    metrics: dict[str, float] = {}
    rows: list[dict[str, str]] = []
    if prompts:
        upsampled = upsample([p["prompt"] for p in prompts])  # greedy: no seed to choose
        metrics = score_upsampling(prompts, upsampled)
        rewrites = list(zip(prompts, upsampled, strict=True))
        write_json(out / UPSAMPLED, [{"prompt": p["prompt"], "upsampled": u} for p, u in rewrites])
        rows = [
            {
                "category": p["category"],
                "prompt": p["prompt"],
                "upsampled": u,
                "added": "; ".join(added_details(p["prompt"], u)) or "nothing",
            }
            for p, u in rewrites[:: max(1, len(rewrites) // EXAMPLES)]
        ]
    return StageResult(
        metrics=metrics,
        speed={"samples_per_s": trained.samples_per_s},
        metadata={
            "train_pairs": len(pairs),
            **counts,
            "final_loss": trained.final_loss,
            "train_seconds": round(trained.seconds, 1),
        },
        tables={"examples": rows},
        curves={"loss": trained.curve},
        register=True,
    )


STAGE = Stage(
    "prompt_upsampler", UpsamplerConfig, ("raw_pairs", "recaptioned_dataset"), run, trains=True
)

if __name__ == "__main__":
    main([STAGE])
