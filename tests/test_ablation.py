"""The caption ablations' configuration, pooling and findings (`ml.eval.ablation`,
`ml.eval.ablation_report`); the assets themselves run in test_caption_assets."""

import dataclasses

import pytest

from ml.config import build_config, to_dict
from ml.eval.ablation import (
    VARIANTS,
    AblationConfig,
    eval_steps,
    partition_keys,
    summary,
    variant_run,
)
from ml.eval.ablation_report import findings, markdown, mean_interval, pooled_rows


def test_variants_differ_in_their_blend_alone() -> None:
    cfg = AblationConfig()
    assert partition_keys(cfg)[:2] == ["alt-seed0", "alt-seed1"]
    assert len(partition_keys(cfg)) == len(VARIANTS) * 2
    runs = [variant_run(cfg, f"{variant}-seed1") for variant in VARIANTS]
    for run in runs:
        assert to_dict(run.model) == to_dict(runs[0].model)
        assert run.model.train.seed == run.blend.seed == 1
        assert (run.blend.caption_type, run.blend.synthetic_ratio) == VARIANTS[run.variant]
    assert runs[0].blend.caption_type == "alt" and runs[0].blend.synthetic_ratio == 0.0
    # another seed changes the model's seed and the blend's draws, nothing else
    other = variant_run(cfg, "alt-seed0")
    assert to_dict(dataclasses.replace(other.model, train=runs[0].model.train)) == to_dict(
        runs[0].model
    )
    assert other.model.train.seed == 0 != runs[0].model.train.seed


def test_config_is_checked_before_any_work() -> None:
    with pytest.raises(ValueError, match="variants must be some of"):
        build_config(AblationConfig, {"variants": ["dsc50"]}, "ablation_model")
    with pytest.raises(ValueError, match="eval_points must be in"):
        build_config(
            AblationConfig, {"eval_points": 5, "model": {"train": {"steps": 4}}}, "ablation_model"
        )
    with pytest.raises(ValueError, match="seeds must be distinct"):
        build_config(AblationConfig, {"seeds": [0, 0]}, "ablation_model")
    cfg = build_config(AblationConfig, {"variants": ["alt"], "seeds": [3]}, "ablation_model")
    with pytest.raises(ValueError, match="no ablation partition 'dsc95-seed3'"):
        variant_run(cfg, "dsc95-seed3")


def test_checkpoints_are_scored_at_even_steps_ending_with_the_last() -> None:
    cfg = AblationConfig()
    assert eval_steps(cfg) == [500, 1000, 1500, 2000]
    cfg.model.train.steps, cfg.eval_points = 10, 3
    assert eval_steps(cfg) == [3, 7, 10]


def scores(clip_alt: list[float], clip_dsc: list[float], follows: list[bool]) -> dict:
    """One checkpoint's raw scores: its per-pair CLIP-S and, in two categories, its verdicts."""
    half = len(follows) // 2
    return {
        "clip_s": {"alt": clip_alt, "descriptive": clip_dsc},
        "verdicts": {"position": follows[:half], "two_object": follows[half:]},
    }


def partition(variant: str, by_step: dict[int, dict]) -> dict:
    return {"run": {"variant": variant}, "scores": {str(s): v for s, v in by_step.items()}}


def test_seeds_pool_into_one_row_per_variant_and_step() -> None:
    a0 = scores([20.0, 22.0], [30.0, 32.0], [True, False, False, False])
    a1 = scores([24.0, 26.0], [34.0, 36.0], [True, True, False, False])
    d0 = scores([25.0, 25.0], [50.0, 52.0], [True, True, True, False])
    rows = pooled_rows({
        "alt-seed0": partition("alt", {5: a0, 10: a0}),
        "alt-seed1": partition("alt", {5: a1, 10: a1}),
        "dsc95-seed0": partition("dsc95", {10: d0}),
    })  # fmt: skip
    assert [(r["variant"], r["step"], r["seeds"]) for r in rows] == [
        ("alt", 5, 2), ("alt", 10, 2), ("dsc95", 10, 1)
    ]  # fmt: skip
    alt = rows[1]
    assert alt["clip_s_alt"] == pytest.approx(23.0)  # every pair of both seeds
    assert alt["clip_s_alt_by_seed"] == [21.0, 25.0]
    mean, low, high = mean_interval([20.0, 22.0, 24.0, 26.0])
    assert (alt["clip_s_alt_low"], alt["clip_s_alt_high"]) == pytest.approx((low, high))
    assert low < mean < high
    # position: 3 of 4 images followed across seeds, two objects 0 of 4; overall their mean
    assert alt["position_accuracy"] == 0.75 and alt["two_object_accuracy"] == 0.0
    assert alt["overall_accuracy"] == pytest.approx(0.375)
    assert alt["overall_by_seed"] == [summary(a0)["overall_accuracy"], 0.5]
    assert alt["overall_low"] < 0.375 < alt["overall_high"]
    # one seed: the pooled figures are that partition's own
    assert rows[2]["clip_s_descriptive"] == summary(d0)["clip_s_descriptive"] == 51.0


def test_findings_say_what_reproduced_and_what_was_not_run() -> None:
    many = 200
    alt = scores([20.0 + i % 3 for i in range(many)], [30.0 + i % 3 for i in range(many)],
                 [i % 10 == 0 for i in range(many)])  # fmt: skip
    ssc = scores([21.0 + i % 3 for i in range(many)], [40.0 + i % 3 for i in range(many)],
                 [i % 4 == 0 for i in range(many)])  # fmt: skip
    dsc = scores([20.5 + i % 3 for i in range(many)], [45.0 + i % 3 for i in range(many)],
                 [i % 2 == 0 for i in range(many)])  # fmt: skip
    parts = {f"{v}-seed0": partition(v, {100: s})
             for v, s in (("alt", alt), ("ssc95", ssc), ("dsc95", dsc))}  # fmt: skip
    ground_truth, descriptive, blends, target = findings(pooled_rows(parts))
    assert ground_truth["reproduced"] is True and "dsc95 +0.50" in ground_truth["measured"]
    assert descriptive["reproduced"] is True
    assert blends["reproduced"] is None and blends["measured"] == "not run"
    # 0.5 against 0.1 overall: 40 points, intervals apart
    assert target["reproduced"] is True and "+40.0 points" in target["measured"]
    # alt above dsc95 on ground truth: not reproduced
    parts["alt-seed0"] = partition("alt", {100: scores(
        [23.0] * many, [30.0] * many, [i % 10 == 0 for i in range(many)])})  # fmt: skip
    rows = pooled_rows(parts)
    assert findings(rows)[0]["reproduced"] is False
    report = markdown(rows, findings(rows), ["figure4.png"])
    assert "**not reproduced**" in report and "![figure4.png](figure4.png)" in report
    assert "| dsc95 | 100 | 1 | 21.5 [" in report
