"""What a running stage reports: every figure to the MLflow run, and a line in the run log every
5% of a loop with its rate and the time left. The Dagster step and a launched worker process
(`dalle3_dag.worker`, whose lines reach Dagster through Pipes) report the same way."""

import time
from collections.abc import Callable
from typing import Any


class ProgressLog:
    """An `ml.stage.Log` that writes lines with `info` and figures to the MLflow run `run_id`
    (through the client: a worker process must not end the step's run when it exits)."""

    def __init__(
        self, info: Callable[[str], None], key: str, run_id: str, every: float = 0.05
    ) -> None:
        import mlflow

        self.info, self.key, self.run_id, self.every = info, key, run_id, every
        self.client = mlflow.MlflowClient()
        self.started: tuple[int, float] | None = None
        self.reported = -1.0

    def metrics(self, step: int, total: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        figures = [Metric(name, float(v), stamp, step) for name, v in values.items()]
        self.client.log_batch(self.run_id, metrics=figures)
        now = time.monotonic()
        if self.started is None or step <= self.started[0]:
            self.started, self.reported = (step, now), step / total
            return
        if step / total - self.reported < self.every and step != total:
            return
        self.reported = step / total
        first, then = self.started
        rate = (step - first) / max(now - then, 1e-9)
        figures = ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        eta = (total - step) / rate if rate else 0.0
        self.info(
            f"{self.key}: step {step}/{total} ({step / total:.0%}), {figures}, "
            f"ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )

    def image(self, name: str, image: Any, step: int | None = None) -> None:
        path = f"{name}/step-{step:06d}.png" if step is not None else f"{name}.png"
        self.client.log_image(self.run_id, image, path)
