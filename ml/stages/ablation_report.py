"""`ablation_report`: the caption ablations' table, findings and figures (the paper's Figures 4
and 5, and the oracle's per-category bars), from every `ablation_model` partition there is.

Writes `report.md` with `figure4.png`, `figure5.png` and `oracle.png` beside it, and
`rows.json` (every variant and step, seeds pooled). `dalle3 results` copies them into
docs/results.md.

    python -m ml.stages.ablation_report --out DIR [--assets assets]
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.files import write_atomic, write_json
from ml.stage import Inputs, Log, Stage, StageResult, main
from ml.stages.ablation_model import RUN, SCORES

REPORT = "report.md"
ROWS = "rows.json"


@dataclass
class AblationReportConfig:
    """What the report holds the results to beyond the paper's own findings."""

    target_gain: float = 0.20  # dsc95 over alt on the oracle's overall prompt following

    def __post_init__(self) -> None:
        if not 0 <= self.target_gain <= 1:
            raise ValueError(f"target_gain must be in [0, 1], got {self.target_gain}")


def read_partitions(folder: Path) -> dict[str, dict[str, Any]]:
    """Every complete partition of an `ablation_model` folder: its run and scores."""
    return {
        part.name: {
            "run": json.loads((part / RUN).read_text()),
            "scores": json.loads((part / SCORES).read_text()),
        }
        for part in sorted(folder.iterdir())
        if part.is_dir() and not part.name.startswith(".") and (part / SCORES).is_file()
    }


def run(cfg: AblationReportConfig, inputs: Inputs, out: Path, log: Log) -> StageResult:
    from ml.eval.ablation_report import (
        FIGURE4,
        FIGURE5,
        final_rows,
        findings,
        markdown,
        oracle_figure,
        pooled_rows,
        score_figure,
    )

    partitions = read_partitions(inputs["ablation_model"])
    if not partitions:
        raise FileNotFoundError(
            "ablation_model has no partitions materialized: `make ablation` trains them"
        )
    rows = pooled_rows(partitions)
    images = {
        "figure4": score_figure(rows, FIGURE4, "Figure 4: caption type (alt, SSC, DSC at 95%)"),
        "figure5": score_figure(rows, FIGURE5, "Figure 5: share of DSC captions in the blend"),
        "oracle": oracle_figure(rows),
    }
    for name, image in images.items():
        image.save(out / f"{name}.png")
    found = findings(rows, cfg.target_gain)
    write_atomic(out / REPORT, markdown(rows, found, [f"{n}.png" for n in images]).encode())
    write_json(out / ROWS, rows)
    metrics = {
        f"{variant}/{name}": value
        for variant, row in final_rows(rows).items()
        for name, value in row.items()
        if isinstance(value, float)
    }
    log.info(f"ablation_report: {len(partitions)} partitions, {len(rows)} rows")
    return StageResult(
        metrics=metrics,
        metadata={"partitions": sorted(partitions), "findings": found},
        images=images,
        tables={"ablation": [{k: v for k, v in r.items() if not k.endswith("_by_seed")}
                             for r in rows]},  # fmt: skip
        files={"findings.json": {"findings": found}},
    )


STAGE = Stage("ablation_report", AblationReportConfig, ("ablation_model",), run)

if __name__ == "__main__":
    main([STAGE])
