"""Stage configs as typed dataclasses, built from params.yaml sections, run config or files;
and `TrainConfig`, the `train:` section every training stage shares.

Every field's value is checked against its annotation, so a bad value is an error naming its
path (`raw_pairs.shard_size: expected an integer`) before any work starts.
"""

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """How a stage trains: the `train:` section of every training stage in params.yaml."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # > 0 keeps an EMA of the weights, and the stage ends with it
    mixed_precision: str = "no"  # fp16 | bf16 on GPUs; CPUs always train in fp32
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 250
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )


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


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain data (tuples as lists, as JSON and YAML give them back)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def load_config(cls: type[T], path: Path, where: str | None = None) -> T:
    """A config from a JSON or YAML file of its fields; missing fields take the defaults."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    return build_config(cls, values, where or str(path))
