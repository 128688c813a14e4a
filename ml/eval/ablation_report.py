"""The ablations' results: each variant's scores by step with seeds pooled, the paper's
findings checked against them, and the figures in the paper's form (Figures 4 and 5).

Seeds are pooled per (variant, step): CLIP-S over every (image, caption) pair of every seed,
with a normal 95% interval of the mean; each oracle category over every image, with a Wilson
interval; GenEval's overall (the mean of the categories) with a normal interval from the
categories' binomial variances. These intervals cover sampling noise; the per-seed values are
listed beside them, since with two seeds the spread between seeds is only shown, not modelled.
"""

import io
import math
from collections import defaultdict
from typing import Any

from PIL import Image

from ml.eval.ablation import CLIP_S_SETTINGS, VARIANTS, summary

FIGURE4 = ("alt", "ssc95", "dsc95")
FIGURE5 = ("dsc65", "dsc80", "dsc90", "dsc95")
PANEL_TITLES = {"alt": "CLIP-S vs ground-truth alt-text", "descriptive": "CLIP-S vs DSC"}


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its normal 95% interval."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def overall_interval(verdicts: dict[str, list[bool]]) -> tuple[float, float]:
    """A normal 95% interval of GenEval's overall score (the mean of the categories' shares),
    from the categories' binomial variances."""
    shares = {c: sum(h) / len(h) for c, h in verdicts.items()}
    se = math.sqrt(sum(p * (1 - p) / len(verdicts[c]) for c, p in shares.items())) / len(shares)
    overall = sum(shares.values()) / len(shares)
    return max(0.0, overall - 1.96 * se), min(1.0, overall + 1.96 * se)


def pooled_rows(partitions: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, step), seeds pooled; `partitions` maps a partition key to its
    `run` (run.json) and `scores` (scores.json)."""
    from ml.eval.oracle import category_scores

    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for part in partitions.values():
        for step, scores in part["scores"].items():
            groups[(part["run"]["variant"], int(step))].append(scores)
    rows = []
    for (variant, step), runs in sorted(groups.items(), key=lambda g: _order(g[0])):
        row: dict[str, Any] = {"variant": variant, "step": step, "seeds": len(runs)}
        per_seed = [summary(r) for r in runs]
        for setting in CLIP_S_SETTINGS:
            pairs = [v for r in runs for v in r["clip_s"].get(setting, [])]
            if pairs:
                mean, low, high = mean_interval(pairs)
                row |= {f"clip_s_{setting}": mean, f"clip_s_{setting}_low": low,
                        f"clip_s_{setting}_high": high}  # fmt: skip
                row[f"clip_s_{setting}_by_seed"] = [f[f"clip_s_{setting}"] for f in per_seed]
        verdicts: dict[str, list[bool]] = defaultdict(list)
        for r in runs:
            for category, hits in r["verdicts"].items():
                verdicts[category] += hits
        if verdicts:
            scores = category_scores(verdicts)
            row |= {k: v for k, v in scores.items() if not k.endswith("_n")}
            row["overall_low"], row["overall_high"] = overall_interval(verdicts)
            row["overall_by_seed"] = [f["overall_accuracy"] for f in per_seed]
        rows.append(row)
    return rows


def _order(group: tuple[str, int]) -> tuple[int, int]:
    return list(VARIANTS).index(group[0]), group[1]


def final_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each variant's row at its last step."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["variant"] not in last or row["step"] > last[row["variant"]]["step"]:
            last[row["variant"]] = row
    return last


def _bounds(name: str) -> tuple[str, str]:
    """The keys of a figure's interval: `clip_s_alt_low`, and `position_low` for a category's
    `position_accuracy`, as `ml.eval.oracle.category_scores` names them."""
    stem = name.removesuffix("_accuracy")
    return f"{stem}_low", f"{stem}_high"


def _cell(row: dict[str, Any], name: str, digits: int = 1) -> str:
    if name not in row:
        return "-"
    low, high = (row[key] for key in _bounds(name))
    return f"{row[name]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _above(a: dict[str, Any], b: dict[str, Any], name: str) -> tuple[float, bool]:
    """a's figure minus b's, and whether a's interval lies wholly above b's."""
    low, high = _bounds(name)
    return a[name] - b[name], a[low] > b[high]


def findings(rows: list[dict[str, Any]], target_gain: float = 0.20) -> list[dict[str, Any]]:
    """The paper's findings, each with `reproduced` (True, False, or None where a variant it
    needs was not run) and the measured text, scored at each variant's last step; and our
    target: dsc95 at least `target_gain` above alt on the oracle's overall prompt following."""
    last = final_rows(rows)
    out = []

    def finding(claim: str, needs: tuple[str, ...], test: Any) -> None:
        if not all(v in last and "clip_s_alt" in last[v] for v in needs):
            out.append({"claim": claim, "reproduced": None, "measured": "not run"})
            return
        reproduced, measured = test()
        out.append({"claim": claim, "reproduced": reproduced, "measured": measured})

    def over_alt(name: str, strict: bool) -> tuple[bool, str]:
        results, texts = [], []
        for variant in ("ssc95", "dsc95"):
            gain, clear = _above(last[variant], last["alt"], name)
            results.append(gain > 0 and (clear or not strict))
            apart = "intervals apart" if clear else "intervals overlap"
            texts.append(f"{variant} {gain:+.2f} ({apart})")
        return all(results), "; ".join(texts) + " over alt"

    finding(
        "(i) ssc95 and dsc95 score at least slightly above alt on ground-truth CLIP-S",
        FIGURE4,
        lambda: over_alt("clip_s_alt", strict=False),
    )
    finding(
        "(i) ssc95 and dsc95 score markedly above alt on descriptive CLIP-S",
        FIGURE4,
        lambda: over_alt("clip_s_descriptive", strict=True),
    )

    def blends() -> tuple[bool, str]:
        values = [last[v]["clip_s_descriptive"] for v in FIGURE5]
        ordered = all(a <= b for a, b in zip(values, values[1:], strict=False))
        _, behind = _above(last["dsc95"], last["dsc65"], "clip_s_descriptive")
        text = ", ".join(f"{v} {x:.2f}" for v, x in zip(FIGURE5, values, strict=True))
        return ordered and behind, f"descriptive CLIP-S {text}; 65% " + (
            "clearly behind 95%" if behind else "not clearly behind 95% (intervals overlap)"
        )

    finding("(ii) higher synthetic blends score higher, 65% clearly behind", FIGURE5, blends)

    def target() -> tuple[bool, str]:
        gain, clear = _above(last["dsc95"], last["alt"], "overall_accuracy")
        return gain >= target_gain and clear, (
            f"dsc95 {last['dsc95']['overall_accuracy']:.3f} against alt "
            f"{last['alt']['overall_accuracy']:.3f}: {100 * gain:+.1f} points, intervals "
            + ("apart" if clear else "overlap")
        )

    if all(v in last and "overall_accuracy" in last[v] for v in ("alt", "dsc95")):
        reproduced, measured = target()
        out.append({"claim": f"(target) dsc95 at least {100 * target_gain:.0f} points above alt "
                    "on the oracle's overall prompt following, intervals apart",
                    "reproduced": reproduced, "measured": measured})  # fmt: skip
    return out


def markdown(rows: list[dict[str, Any]], found: list[dict[str, Any]], figures: list[str]) -> str:
    """The report: the findings, the table and the figures (file names beside the report)."""
    verdict = {True: "**reproduced**", False: "**not reproduced**", None: "not run"}
    lines = ["### Findings", ""]
    lines += [
        f"- {f['claim']}: {verdict[f['reproduced']]}"
        + (f" ({f['measured']})" if f["reproduced"] is not None else "")
        for f in found
    ]
    lines += ["", "### Every variant and step (seeds pooled, 95% intervals)", "",
              "| variant | step | seeds | CLIP-S vs alt-text | CLIP-S vs DSC | oracle overall | "
              "overall by seed |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        by_seed = ", ".join(f"{v:.3f}" for v in row.get("overall_by_seed", []))
        lines.append(
            f"| {row['variant']} | {row['step']} | {row['seeds']} | {_cell(row, 'clip_s_alt')} | "
            f"{_cell(row, 'clip_s_descriptive')} | {_cell(row, 'overall_accuracy', 3)} | "
            f"{by_seed} |"
        )
    lines += ["", *[f"![{name}]({name})" for name in figures], ""]
    return "\n".join(lines)


def _to_image(figure: Any) -> Image.Image:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _errors(points: list[dict[str, Any]], name: str) -> list[list[float]]:
    """Matplotlib's asymmetric error bars of `name` from its `_low` and `_high`."""
    low, high = _bounds(name)
    return [[p[name] - p[low] for p in points], [p[high] - p[name] for p in points]]


def score_figure(rows: list[dict[str, Any]], variants: tuple[str, ...], title: str) -> Image.Image:
    """Score against training step, one panel per scoring caption, a line per variant with
    its 95% interval (the paper's Figures 4 and 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CLIP_S_SETTINGS), figsize=(10, 3.8))
    for axis, setting in zip(axes, CLIP_S_SETTINGS, strict=True):
        name = f"clip_s_{setting}"
        for variant in variants:
            points = [r for r in rows if r["variant"] == variant and name in r]
            if not points:
                continue
            steps = [r["step"] for r in points]
            means = [r[name] for r in points]
            errors = _errors(points, name)
            axis.errorbar(steps, means, yerr=errors, marker="o", capsize=3, label=variant)
        axis.set(title=PANEL_TITLES[setting], xlabel="training step", ylabel="CLIP-S (x100)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    return _to_image(figure)


def oracle_figure(rows: list[dict[str, Any]]) -> Image.Image:
    """The oracle's per-category prompt following of each variant at its last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = final_rows(rows)
    categories = sorted({k.removesuffix("_accuracy") for r in last.values() for k in r
                         if k.endswith("_accuracy") and k != "overall_accuracy"})  # fmt: skip
    figure, axis = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / max(len(last), 1)
    for i, (variant, row) in enumerate(last.items()):
        xs = [c + i * width for c in range(len(categories))]
        cells = [{"v": row.get(f"{c}_accuracy", 0.0), "v_low": row.get(f"{c}_low", 0.0),
                  "v_high": row.get(f"{c}_high", 0.0)} for c in categories]  # fmt: skip
        axis.bar(xs, [c["v"] for c in cells], width, yerr=_errors(cells, "v"), capsize=2,
                 label=variant)  # fmt: skip
    axis.set_xticks([c + 0.4 - width / 2 for c in range(len(categories))], categories, rotation=20)
    axis.set(ylabel="share of images that follow the prompt", ylim=(0, 1))
    axis.set_title("Oracle prompt following by category (descriptive prompts, last step)")
    axis.legend(ncol=len(last))
    return _to_image(figure)
