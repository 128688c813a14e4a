"""The shipped profiles build every stage's `ml` config, so a typo fails here and not on a GPU
node; the real profile names the paths it needs at its top, and holds what it promises."""

import re
from pathlib import Path

import pytest
import yaml

from dalle3_dag.definitions import PARAMS
from dalle3_dag.project import validate_params

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "profiles" / "gpu.yaml"


def named_paths(text: str) -> list[tuple[list[str], str]]:
    """The (field path, value) pairs the profile's header lists."""
    found = re.findall(r"^#\s+([a-z_]+(?:\.[a-z_]+)+)\s+(\S+)", text, flags=re.MULTILINE)
    return [(field.split("."), value) for field, value in found]


def field(params: dict, path: list[str]) -> dict:
    """The mapping that holds the last name of `path`."""
    for name in path[:-1]:
        params = params[name]
    return params


@pytest.mark.parametrize("name", ["params.yaml", "profiles/ci.yaml"])
def test_profile_builds_every_section(name, monkeypatch):
    monkeypatch.setenv("DALLE3_PARAMS", str(REPO / name))
    validate_params(PARAMS)


def test_gpu_profile_builds_once_its_paths_exist(tmp_path, monkeypatch):
    """Every path the header names, made to exist here, is all the profile lacks."""
    text = GPU.read_text()
    params = yaml.safe_load(text)
    named = named_paths(text)
    assert len(named) == 6
    for path, value in named:
        assert field(params, path)[path[-1]] == value, ".".join(path)
        here = tmp_path / value.lstrip("/")
        if Path(value).suffix:  # a weights or captions file
            here.parent.mkdir(parents=True, exist_ok=True)
            here.write_text("")
        else:
            here.mkdir(parents=True)
        field(params, path)[path[-1]] = str(here)
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("DALLE3_PARAMS", str(tmp_path / "gpu.yaml"))
    validate_params(PARAMS)


def test_gpu_profile_runs_the_real_models():
    params = yaml.safe_load(GPU.read_text())
    clip = params["clip_encoder"]
    assert (clip["source"], clip["model_name"]) == ("pretrained", "ViT-B-32")
    assert params["diffusion_model"]["train_text_encoder"] is False
    assert params["diffusion_model"]["image_size"] == 256
    trainers = [name for name, section in params.items() if "train" in section]
    assert len(trainers) == 6
    assert {params[name]["train"]["mixed_precision"] for name in trainers} == {"bf16"}
