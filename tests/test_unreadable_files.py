"""Weights and checkpoints that are truncated, corrupt or hostile: refused with the file named,
and training goes on from the checkpoint before, ending where an unbroken run ends."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ml.clip import build_toy_clip, load_clip, save_clip
from ml.clip_config import ClipConfig
from ml.config import TrainConfig
from ml.files import UnreadableFile, check_loadable
from ml.train import CHECKPOINTS, Shuffled, checkpoint_steps, train

CFG = TrainConfig(steps=6, batch_size=4, warmup_steps=1, log_every=1, checkpoint_every=2)


class Messages:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    def metrics(self, step: int, total: int, values: dict[str, float]) -> None:
        pass

    def image(self, name: str, image: object, step: int | None = None) -> None:
        pass


def fit(work: Path, log: Messages | None = None, max_steps: int | None = None) -> torch.Tensor:
    """A linear regression trained with the one training loop; its final weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(16, 3)
    y = x.sum(dim=1, keepdim=True)

    def batch(indices: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return x[indices], y[indices]

    def loss(modules, data, generator) -> torch.Tensor:
        return torch.nn.functional.mse_loss(modules[0](data[0]), data[1])

    kwargs = {"log": log} if log else {}
    batches = Shuffled(16, CFG.batch_size, seed=0, make=batch)
    train([model], loss, batches, CFG, work=work, max_steps_this_run=max_steps, **kwargs)
    return model.weight.detach().clone()


class Hostile:
    """Unpickling this runs a shell command: what a tampered checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["truncated weights", "hostile pickle"])
def test_an_unreadable_checkpoint_is_set_aside_and_the_one_before_resumes(
    damage: str, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    fit(work, max_steps=4)
    newest = work / CHECKPOINTS / "step-4"
    assert checkpoint_steps(work) == [2, 4]
    marker = tmp_path / "pwned"
    if damage == "truncated weights":
        bad = newest / "model.safetensors"
        truncate(bad)
    else:
        bad = newest / "optimizer.bin"
        torch.save(Hostile(marker), bad)

    log = Messages()
    resumed = fit(work, log)

    assert not marker.exists(), "the pickle ran code"
    said = [line for line in log.lines if "set aside" in line]
    assert len(said) == 1 and str(bad) in said[0], log.lines
    assert (work / CHECKPOINTS / "unreadable-step-4" / bad.name).is_file()
    assert checkpoint_steps(work) == [4, 6]  # from step 2 on, written anew
    assert torch.equal(resumed, fit(tmp_path / "whole"))


def test_a_hostile_pickle_is_refused_naming_the_file(tmp_path: Path) -> None:
    marker, bad = tmp_path / "pwned", tmp_path / "random_states_0.pkl"
    torch.save(Hostile(marker), bad)
    with pytest.raises(UnreadableFile, match="random_states_0.pkl"):
        check_loadable(bad)
    assert not marker.exists()
    save_file({"w": torch.ones(2)}, tmp_path / "fine.safetensors")
    check_loadable(tmp_path / "fine.safetensors")


def test_a_truncated_model_file_is_named_when_the_model_loads(tmp_path: Path) -> None:
    cfg = ClipConfig()
    save_clip(build_toy_clip(cfg), cfg, tmp_path / "clip")
    (weights,) = (tmp_path / "clip").glob("*.safetensors")
    load_clip(tmp_path / "clip")
    truncate(weights)
    with pytest.raises(UnreadableFile, match=weights.name):
        load_clip(tmp_path / "clip")
