"""Where the project lives on disk and how stage parameters are resolved.

params.yaml is the single source of stage parameters: DVC lists each stage's section as a
dependency, and every asset starts from that section. Dagster run config only overrides
individual fields, so a launch from the UI and `dvc repro` agree on what was run.
"""

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

PROJECT_DIR = Path(os.environ.get("DALLE3_PROJECT_DIR", Path(__file__).resolve().parents[1]))

T = TypeVar("T")

# Op tags of the steps that train a model. Each uses every core (torch's default thread count),
# so two side by side stall each other at every thread barrier: in one make run captioner_ssc
# and captioner_dsc together took 27 and 33 minutes for about 16 minutes of work. The
# executor in `definitions` runs them one at a time.
TRAINING_TAGS = {"dalle3/compute": "training"}


def params_path(project_dir: Path = PROJECT_DIR) -> Path:
    return Path(os.environ.get("DALLE3_PARAMS", project_dir / "params.yaml"))


def load_params(section: str, project_dir: Path = PROJECT_DIR) -> dict[str, Any]:
    """One section of params.yaml; a missing file or section is an error naming it."""
    path = params_path(project_dir)
    if not path.is_file():
        raise FileNotFoundError(f"parameters file not found: {path}")
    params = yaml.safe_load(path.read_text()) or {}
    if section not in params:
        raise KeyError(f"{path} has no section '{section}'")
    return params[section]


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge run-config overrides into params; None means 'keep the params value'."""
    merged = dict(base)
    for name, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            base_value = merged.get(name)
            value = merge(base_value if isinstance(base_value, dict) else {}, value)
        merged[name] = value
    return merged


def build_config(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build an `ml` config dataclass, naming the offending field when a value does not fit.

    Nested dataclass fields are built from nested mappings.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        ftype = hints[name]
        if dataclasses.is_dataclass(ftype) and isinstance(value, dict):
            value = build_config(ftype, value, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def resolve(cls: type[T], section: str, overrides: BaseModel) -> T:
    """The `ml` config of a stage: its params.yaml section with the run config laid over it."""
    return build_config(cls, merge(load_params(section), overrides.model_dump()), section)
