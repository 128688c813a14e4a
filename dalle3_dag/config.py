"""Run-config pieces shared by the assets that train: every field overrides params.yaml."""

import dagster as dg


class TrainParams(dg.Config):
    """Overrides of a stage's `train` section (ml.train.TrainConfig)."""

    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    seed: int | None = None
