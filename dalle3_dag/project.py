"""Where the project lives on disk and how stage parameters are resolved.

params.yaml is the single source of stage parameters: DVC lists each stage's section as a
dependency, and every asset starts from that section. Dagster run config only overrides
individual fields, so a launch from the UI and `dvc repro` agree on what was run.
"""

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

PROJECT_DIR = Path(os.environ.get("DALLE3_PROJECT_DIR", Path(__file__).resolve().parents[1]))

T = TypeVar("T")
# DVC exports this to the commands it runs; inside `dvc repro` the lock is DVC's to write.
DVC_REPRO_ENV = "DVC_STAGE"

# Op tags of the steps that train a model. Each uses every core (torch's default thread count),
# so two side by side stall each other at every thread barrier: in one make run captioner_ssc
# and captioner_dsc together took 27 and 33 minutes for about 16 minutes of work. The
# executor in `definitions` runs them one at a time.
TRAINING_TAGS = {"dalle3/compute": "training"}


def params_path(project_dir: Path = PROJECT_DIR) -> Path:
    return Path(os.environ.get("DALLE3_PARAMS", project_dir / "params.yaml"))


def read_params(project_dir: Path = PROJECT_DIR) -> tuple[Path, dict[str, Any]]:
    """The params file and its sections; a missing file is an error naming it."""
    path = params_path(project_dir)
    if not path.is_file():
        raise FileNotFoundError(f"parameters file not found: {path}")
    return path, yaml.safe_load(path.read_text()) or {}


def load_params(section: str, project_dir: Path = PROJECT_DIR) -> dict[str, Any]:
    """One section of params.yaml; a missing file or section is an error naming it."""
    path, params = read_params(project_dir)
    if section not in params:
        raise KeyError(f"{path} has no section '{section}'")
    return params[section]


def validate_params(sections: dict[str, type], project_dir: Path = PROJECT_DIR) -> None:
    """Check every section of the params file before any work: a misspelt section or field,
    a value of the wrong type or out of range is an error naming its path."""
    path, params = read_params(project_dir)
    unknown = sorted(set(params) - set(sections))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; known: {sorted(sections)}")
    missing = sorted(set(sections) - set(params))
    if missing:
        raise KeyError(f"{path} has no section(s) {missing}")
    for section, cls in sections.items():
        try:
            build_config(cls, params[section], section)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


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


def _type_error(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit the type hint `hint`, or None if it does."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        reasons = [_type_error(value, arg) for arg in args]
        return None if None in reasons else f"expected {_name(hint)}, got {value!r}"
    if hint is type(None):
        return None if value is None else f"expected null, got {value!r}"
    if origin is typing.Literal:
        return None if value in args else f"expected one of {list(args)}, got {value!r}"
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {value!r}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"expected an integer, got {value!r}"
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return f"expected a list, got {value!r}"
        item = args[0] if args else Any
        return next((e for e in (_type_error(v, item) for v in value) if e), None)
    if origin is dict:
        if not isinstance(value, dict):
            return f"expected a mapping, got {value!r}"
        key_type, value_type = args or (Any, Any)
        for k, v in value.items():
            if error := _type_error(k, key_type) or _type_error(v, value_type):
                return f"[{k!r}]: {error}"
        return None
    if isinstance(hint, type):
        return None if isinstance(value, hint) else f"expected {_name(hint)}, got {value!r}"
    return None


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def build_config(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build an `ml` config dataclass, naming the offending field when a value does not fit.

    Every field's type is checked against its annotation first, so `shard_size: big` is
    reported as `raw_pairs.shard_size` rather than failing deep inside the stage. Nested
    dataclass fields are built from nested mappings.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of fields, got {values!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        ftype = hints[name]
        if dataclasses.is_dataclass(ftype):
            value = build_config(ftype, value, f"{where}.{name}")
        elif error := _type_error(value, ftype):
            raise ValueError(f"{where}.{name}: {error}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def effective_params(section: str, overrides: BaseModel | None = None) -> dict[str, Any]:
    """A stage's params.yaml section with the run config laid over it: what the stage runs.

    Under `dvc repro` DVC records params.yaml's values itself, so the run must use exactly
    those: another params file or an override there is refused before any work.
    """
    values = merge(load_params(section), overrides.model_dump() if overrides else {})
    if os.environ.get(DVC_REPRO_ENV):
        recorded = yaml.safe_load((PROJECT_DIR / "params.yaml").read_text()).get(section)
        if values != recorded:
            raise ValueError(
                f"{section}: under `dvc repro` a stage runs params.yaml's values as they are; "
                f"this run's differ (DALLE3_PARAMS or run config): {values} != {recorded}"
            )
    return values


def resolve(cls: type[T], section: str, overrides: BaseModel | None = None) -> T:
    """The `ml` config of a stage: its params.yaml section with the run config laid over it."""
    return build_config(cls, effective_params(section, overrides), section)
