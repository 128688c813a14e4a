"""Where the project lives on disk and how stage parameters are resolved.

params.yaml is the single source of stage parameters: DVC lists each stage's section as a
dependency, and every asset starts from that section. Dagster run config only overrides
individual fields, so a launch from the UI and `dvc repro` agree on what was run.
"""

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ml.config import build_config, merge

S3_URI_ENV = "DALLE3_S3_URI"  # s3://bucket/prefix: the asset store's S3 copy
PROJECT_DIR = Path(os.environ.get("DALLE3_PROJECT_DIR", Path(__file__).resolve().parents[1]))

T = TypeVar("T")
# DVC exports this to the commands it runs; inside `dvc repro` the lock is DVC's to write.
DVC_REPRO_ENV = "DVC_STAGE"

# The Dagster concurrency pool of the steps that train a model: one at a time per node, across
# runs (dagster.yaml sets its limit). Each uses every core, or with torchrun every accelerator,
# so two side by side stall each other: in one make run captioner_ssc and captioner_dsc
# together took 27 and 33 minutes for about 16 minutes of work.
ACCELERATOR_POOL = "accelerator"


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


def effective_params(section: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stage's params.yaml section with the run config laid over it: what the stage runs.

    Under `dvc repro` DVC records params.yaml's values itself, so the run must use exactly
    those: another params file or an override there is refused before any work.
    """
    values = merge(load_params(section), overrides or {})
    if os.environ.get(DVC_REPRO_ENV):
        recorded = yaml.safe_load((PROJECT_DIR / "params.yaml").read_text()).get(section)
        if values != recorded:
            raise ValueError(
                f"{section}: under `dvc repro` a stage runs params.yaml's values as they are; "
                f"this run's differ (DALLE3_PARAMS or run config): {values} != {recorded}"
            )
    return values


def resolve(
    cls: type[T], section: str, overrides: dict[str, Any] | None = None
) -> tuple[T, dict[str, Any]]:
    """The `ml` config of a stage and the params values it was built from (for dvc.lock)."""
    values = effective_params(section, overrides)
    return build_config(cls, values, section), values
