"""The one training loop, through every stage that trains: a stage killed with SIGKILL and run
again resumes from its last checkpoint and ends with the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SMALL_PARAMS
from safetensors.torch import load_file

from ml.config import TrainConfig, build_config
from ml.stage import Inputs, run_stage
from ml.stages import (
    captioner,
    clip_encoder,
    diffusion_model,
    distilled_model,
    image_autoencoder,
    mixed_training_set,
    prompt_upsampler,
    raw_pairs,
)
from ml.stages import recaptioned_dataset as recaptioned
from ml.train import checkpoint_steps, lr_lambda

REPO = Path(__file__).resolve().parents[1]
# Small enough to train in seconds, long enough to be killed after the first checkpoint.
TRAIN = {"steps": 12, "checkpoint_every": 3, "log_every": 1}


def small(stage, **train) -> object:
    values = SMALL_PARAMS[stage.name] | {"train": SMALL_PARAMS[stage.name]["train"] | train}
    return build_config(stage.config, values, stage.name)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every input of the trainers (raw_pairs to the image autoencoder and diffusion_model),
    made by their stages with the test profile's settings."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("assets")

    def make(stage, cfg, partitions=()) -> None:
        folders = {key: root / key for key in stage.inputs}
        run_stage(stage, cfg, Inputs(folders, partitions=list(partitions)), root / stage.name)

    make(raw_pairs.STAGE, build_config(raw_pairs.STAGE.config, SMALL_PARAMS["raw_pairs"], "raw"))
    make(clip_encoder.STAGE, small(clip_encoder.STAGE, steps=4))
    for stage in (captioner.BASE, captioner.SSC, captioner.DSC):
        make(stage, small(stage, steps=2))
    make(recaptioned.STAGE, build_config(recaptioned.STAGE.config, {"batch_size": 32}, "r"))
    make(mixed_training_set.STAGE, mixed_training_set.STAGE.config())
    make(image_autoencoder.STAGE, small(image_autoencoder.STAGE, steps=2))
    make(diffusion_model.STAGE, small(diffusion_model.STAGE, steps=2))
    return root


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor a stage saved, by file and name."""
    return {
        f"{path.relative_to(folder)}:{name}": tensor
        for path in sorted(folder.rglob("*.safetensors"))
        for name, tensor in load_file(path).items()
    }


def command(module: str, stage: str, config: Path, out: Path, assets: Path) -> list[str]:
    cmd = [sys.executable, "-m", module, "--config", str(config), "--out", str(out)]
    cmd += ["--assets", str(assets), "--work", str(out.with_name(out.name + ".work"))]
    return cmd + (["--stage", stage] if module == "ml.stages.captioner" else [])


@pytest.mark.parametrize(
    "stage",
    [
        clip_encoder.STAGE,
        captioner.BASE,
        captioner.SSC,
        captioner.DSC,
        image_autoencoder.STAGE,
        diffusion_model.STAGE,
        distilled_model.STAGE,
        prompt_upsampler.STAGE,
    ],
    ids=lambda stage: stage.name,
)
def test_sigkill_then_resume_equals_an_uninterrupted_run(stage, assets: Path, tmp_path: Path):
    cfg = SMALL_PARAMS[stage.name] | {"train": SMALL_PARAMS[stage.name]["train"] | TRAIN}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # both runs do the same floating-point sums
    cut = tmp_path / "cut"
    process = subprocess.Popen(
        command(stage.module, stage.name, config, cut, assets),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work = cut.with_name("cut.work")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
            checkpoint_steps(run) for run in (work.iterdir() if work.is_dir() else [])
        ):
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    (run,) = work.iterdir()
    killed_at = checkpoint_steps(run)[-1]
    assert killed_at < TRAIN["steps"], "finished before the kill"

    for out in (cut, tmp_path / "whole"):
        proc = subprocess.run(
            command(stage.module, stage.name, config, out, assets),
            cwd=REPO, env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, whole = weights(cut), weights(tmp_path / "whole")
    assert resumed.keys() == whole.keys() and resumed
    unequal = [k for k in whole if not torch.equal(resumed[k], whole[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"
    assert checkpoint_steps(run)[-1] == TRAIN["steps"]
    # the loss curve holds every step, those before the kill included, as the whole run's
    curve = (cut.with_name("cut.log") / "loss.csv").read_text()
    assert curve == (tmp_path / "whole.log" / "loss.csv").read_text()
    assert len(curve.splitlines()) == 1 + TRAIN["steps"]


def test_warmup_then_cosine_to_a_tenth() -> None:
    factor = lr_lambda(TrainConfig(steps=110, warmup_steps=10))
    assert [factor(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert factor(60) == pytest.approx(0.55) and factor(110) == pytest.approx(0.1)


def test_train_config_names_a_bad_field() -> None:
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=0)
