"""One process of a launched stage (`torchrun ... -m dalle3_dag.worker REQUEST`), the other
end of `dalle3_dag.launch`: rank 0 reports through Dagster Pipes and MLflow and writes the
version; every other rank trains with it (its out folder a scratch one) and ends there."""

import importlib
import json
import os
import sys
from pathlib import Path

from dagster_pipes import open_dagster_pipes

from dalle3_dag.progress import ProgressLog
from ml.config import build_config
from ml.stage import NO_LOG, Inputs, Stage, run_stage


def find_stage(module: str, name: str) -> Stage:
    found = [v for v in vars(importlib.import_module(module)).values() if isinstance(v, Stage)]
    return next(stage for stage in found if stage.name == name)


def main(path: Path) -> None:
    request = json.loads(path.read_text())
    stage = find_stage(request["module"], request["stage"])
    cfg = build_config(stage.config, request["config"], stage.name)
    given = request["inputs"]
    inputs = Inputs(
        folders={k: Path(v) for k, v in given["folders"].items()},
        versions=given["versions"],
        work=Path(given["work"]),
        resume=given["resume"],
        partitions=given["partitions"],
    )
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        run_stage(stage, cfg, inputs, Path(request["scratch"]) / f"rank-{rank}", NO_LOG)
        return
    with open_dagster_pipes() as pipes:
        log = ProgressLog(pipes.log.info, stage.name, request["mlflow_run_id"])
        result = run_stage(stage, cfg, inputs, Path(request["out"]), log)
        result.save(Path(request["result"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
