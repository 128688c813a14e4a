"""The asset factory: run-config classes derived from the stages' config dataclasses."""

from pathlib import Path

import pydantic
import pytest
import yaml

from dalle3_dag.definitions import STAGES
from dalle3_dag.factory import config_class

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_every_params_field_is_a_run_config_field(stage) -> None:
    """The whole params.yaml section, nested sections included, is a valid run config of its
    asset, and what it leaves out stays unset (params.yaml's value is kept)."""
    section = yaml.safe_load((REPO / "params.yaml").read_text())[stage.name]
    overrides = config_class(stage.config, f"test_{stage.name}")(**section)
    dumped = overrides.model_dump(exclude_none=True)
    assert dumped == section


def test_nested_fields_keep_their_types() -> None:
    (clip,) = [stage for stage in STAGES if stage.name == "clip_encoder"]
    overrides = config_class(clip.config, "test_clip_types")
    assert overrides(train={"steps": 4}).model_dump()["train"]["steps"] == 4
    assert overrides(train={"steps": 4}).model_dump()["train"]["lr"] is None  # params.yaml's
    with pytest.raises(pydantic.ValidationError, match="steps"):
        overrides(train={"steps": "many"})
