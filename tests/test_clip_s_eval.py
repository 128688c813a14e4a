"""The `clip_s_eval` stage on tiny untrained models: every figure, deterministic, with grids."""

import json
import shutil
from pathlib import Path

import pytest

from ml.clip import build_toy_clip, save_clip
from ml.clip_config import ClipConfig
from ml.data.raw_pairs import RawPairsConfig, build_raw_pairs, load_split
from ml.data.shapeworld import EVAL_CATEGORIES
from ml.diffusion.config import DiffusionConfig
from ml.diffusion.pipeline import build_pipeline
from ml.eval.config import ClipSEvalConfig
from ml.stage import Inputs, read_metrics, run_stage
from ml.stages.clip_s_eval import SINGLE, STAGE, STYLES
from ml.upsampler.config import T5Shape, UpsamplerConfig
from ml.upsampler.model import LocalUpsampler, build_model

TINY_UNET = {
    "image_size": 16, "text_dim": 32, "text_layers": 1, "text_heads": 2, "text_ff_dim": 64,
    "block_out_channels": (8, 16), "cross_attention_levels": 1, "attention_head_dim": 4,
    "norm_num_groups": 4, "num_train_timesteps": 100,
}  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    raw = root / "raw_pairs"
    raw.mkdir()
    splits = {"train": 8, "labelled": 4, "clip": 4, "eval": 6}
    build_raw_pairs(RawPairsConfig(splits=splits, shard_size=8, prompts_per_category=2), raw)
    clip_cfg = ClipConfig()
    save_clip(build_toy_clip(clip_cfg), clip_cfg, root / "clip_encoder")
    corpus = [s.meta["descriptive_caption"] for s in load_split(raw, "train")]
    build_pipeline(DiffusionConfig(**TINY_UNET), corpus).save_pretrained(root / "diffusion_model")
    shutil.copytree(root / "diffusion_model", root / "distilled_model")
    upsampler_cfg = UpsamplerConfig(vocab_size=300, model=T5Shape(16, 4, 32, 1, 2))
    model, tokenizer = build_model(upsampler_cfg, corpus)  # untrained: any rewrite will do
    LocalUpsampler(model, tokenizer).save_pretrained(root / "prompt_upsampler", 24)
    return {name: root / name for name in STAGE.inputs}


def evaluate(assets: dict[str, Path], out: Path):
    cfg = ClipSEvalConfig(images_per_prompt=2, captions=4, teacher_steps=2, student_steps=1,
                          batch_size=8, grid_prompts=2)  # fmt: skip
    return run_stage(STAGE, cfg, Inputs(assets), out)


def test_every_figure_for_both_models_the_same_on_a_rerun(assets, tmp_path) -> None:
    result = evaluate(assets, tmp_path / "a")
    metrics = read_metrics(tmp_path / "a")
    for model in ("teacher", "student"):
        for variant in ("paper", "hessel"):
            for setting in ("alt", "descriptive"):
                assert f"{model}_clip_s_{variant}_{setting}" in metrics
        for style in STYLES:
            for category in (*EVAL_CATEGORIES, *SINGLE):
                assert metrics[f"{model}_{style}_{category}_n"] == 4  # 2 prompts x 2 images
                low, high = (metrics[f"{model}_{style}_{category}_{e}"] for e in ("low", "high"))
                assert low <= metrics[f"{model}_{style}_{category}_accuracy"] <= high
        assert (tmp_path / "a" / f"{model}_samples.png").is_file()
    assert [(r["model"], r["prompts"]) for r in result.tables["prompt_following"]] == [
        ("teacher", "descriptive"), ("teacher", "short"), ("teacher", "upsampled"),
        ("student", "descriptive"), ("student", "short"), ("student", "upsampled"),
    ]  # fmt: skip
    rewrites = json.loads((tmp_path / "a" / "scores.json").read_text())["upsampled_prompts"]
    assert len(rewrites) == len(json.loads((assets["raw_pairs"] / "prompts.json").read_text()))
    assert len(result.tables["clip_s"]) == 4
    assert len(result.examples) == len(EVAL_CATEGORIES)
    evaluate(assets, tmp_path / "b")
    assert read_metrics(tmp_path / "b") == metrics  # fixed seeds: the same images, scores


def test_a_missing_model_is_named_before_any_work(assets, tmp_path) -> None:
    missing = assets | {"distilled_model": tmp_path / "nowhere"}
    with pytest.raises(FileNotFoundError, match="distilled_model"):
        evaluate(missing, tmp_path / "out")
