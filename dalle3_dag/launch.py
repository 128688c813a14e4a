"""Trainers on more than one process: the step launches `torchrun` (DDP over gloo on CPUs,
NCCL on GPUs) through Dagster Pipes, which streams the workers' log lines into the run.

Every rank trains (`ml.train` checks that their weights end equal); rank 0 then saves and
evaluates into the staged version and reports to the step's MLflow run. What comes back is
the stage's `StageResult`, so the rest of the step (checks, DVC, MLflow, metadata) is the same
as in one process.
"""

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from ml.config import to_dict
from ml.stage import Inputs, Stage, StageResult

LAUNCH = "launch"  # the params.yaml section


@dataclass
class LaunchConfig:
    """params.yaml's `launch` section: the trainers' process layout. One process on one node
    trains inside the Dagster step; more run under torchrun, `processes_per_node` on each of
    `nodes` (which meet at `rdzv_endpoint`, host:port of node 0). Each process takes the
    stage's `train.batch_size`, so the global batch grows with the process count."""

    processes_per_node: int = 1
    nodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""

    def __post_init__(self) -> None:
        for name in ("processes_per_node", "nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.node_rank < self.nodes:
            raise ValueError(f"node_rank must be in [0, {self.nodes}), got {self.node_rank}")
        if self.nodes > 1 and ":" not in self.rdzv_endpoint:
            raise ValueError("nodes > 1 needs rdzv_endpoint: host:port of node 0")

    @property
    def processes(self) -> int:
        return self.processes_per_node * self.nodes


def torchrun(launch: LaunchConfig, request: Path) -> list[str]:
    """The command that runs `dalle3_dag.worker` on this node's processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    cmd += [f"--nproc-per-node={launch.processes_per_node}", f"--nnodes={launch.nodes}"]
    if launch.nodes > 1:
        cmd += [f"--node-rank={launch.node_rank}", "--rdzv-backend=c10d"]
        cmd += [f"--rdzv-endpoint={launch.rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    return [*cmd, "-m", "dalle3_dag.worker", str(request)]


def launched(
    context: dg.AssetExecutionContext,
    stage: Stage,
    cfg: Any,
    inputs: Inputs,
    out: Path,
    launch: LaunchConfig,
) -> StageResult:
    """Run `stage` into `out` on `launch.processes` processes and return its result."""
    import mlflow

    work = inputs.work.with_name(f"{inputs.work.name}.launch")  # beside the checkpoints
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    request: dict[str, Any] = {
        "module": stage.module,
        "stage": stage.name,
        "config": to_dict(cfg),
        "inputs": {
            "folders": {k: str(v) for k, v in inputs.folders.items()},
            "versions": inputs.versions,
            "work": str(inputs.work),
            "resume": inputs.resume,
            "partitions": inputs.partitions,
        },
        "out": str(out),
        "scratch": str(work / "ranks"),
        "result": str(work / "result"),
        "mlflow_run_id": mlflow.active_run().info.run_id,
    }
    (work / "request.json").write_text(json.dumps(request, indent=2))
    command = torchrun(launch, work / "request.json")
    context.log.info(f"{stage.name}: {launch.processes} processes: {' '.join(command)}")
    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    dg.PipesSubprocessClient().run(context=context, command=command, env=env)
    result = StageResult.load(work / "result")
    result.metadata["processes"] = launch.processes
    shutil.rmtree(work / "ranks", ignore_errors=True)
    return result
