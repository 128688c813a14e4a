"""The stage contract: every stage of the pipeline is one `run(cfg, inputs, out, log)`.

A stage reads its input assets' folders, writes its output folder and returns its held-out
metrics, images and whether the folder is a model to register. The Dagster asset factory
(`dalle3_dag.factory`) and the command line (`python -m ml.stages.<stage>`, also under
`accelerate launch` / `torchrun`) both call it through `run_stage`, so what a stage writes and
measures is the same however it is launched.
"""

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from ml.config import build_config, load_config, to_dict
from ml.files import write_csv, write_json

METRICS_FILE = "metrics.json"
# Not config.json: transformers and diffusers own that name inside model folders.
CONFIG_FILE = "effective_config.json"
RESULT_FILE = "result.json"  # a saved StageResult (StageResult.save)
CADENCE_FIELDS = frozenset({"log_every", "checkpoint_every", "keep_checkpoints", "sample_every"})


class Log(Protocol):
    """Where a stage reports while it runs: the Dagster run log and MLflow, or a terminal."""

    def info(self, message: str) -> None: ...

    def metrics(self, step: int, total: int, values: dict[str, float]) -> None:
        """Progress of a loop of `total` steps, with its figures at `step`."""

    def image(self, name: str, image: Image.Image, step: int | None = None) -> None: ...


class _NoLog:
    def info(self, message: str) -> None:
        pass

    def metrics(self, step: int, total: int, values: dict[str, float]) -> None:
        pass

    def image(self, name: str, image: Image.Image, step: int | None = None) -> None:
        pass


NO_LOG: Log = _NoLog()


@dataclass
class Inputs:
    """What a stage reads: its input assets' folders, and where a trainer keeps checkpoints.

    `versions` (the inputs' data versions) make a checkpoint's identity with the config, so a
    changed dataset starts training over. `partitions` are the shard partitions a partitioned
    stage is asked for. `s3` makes the client for s3:// URIs.
    """

    folders: dict[str, Path]
    versions: dict[str, str] = field(default_factory=dict)
    work: Path | None = None
    resume: bool = True
    partitions: list[str] = field(default_factory=list)
    s3: Callable[[], Any] | None = None

    def __getitem__(self, key: str) -> Path:
        folder = self.folders.get(key)
        if folder is None or not Path(folder).exists():
            raise FileNotFoundError(f"input asset {key} is not materialized at {folder}")
        return Path(folder)

    def s3_client(self) -> Any:
        if self.s3 is not None:
            return self.s3()
        import boto3

        return boto3.client("s3")

    def checkpoints(self, cfg: Any) -> Path | None:
        """The checkpoint folder of a training run: one per (config, input data), so a changed
        config or dataset starts over while a rerun of a killed run resumes. Cadence fields
        (what is logged or saved, when) may change on a resume and are left out."""
        if self.work is None:
            return None
        identity = {"config": _identity(to_dict(cfg)), "data": self.versions}
        text = json.dumps(identity, sort_keys=True)
        return self.work / hashlib.sha256(text.encode()).hexdigest()[:16]


def _identity(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _identity(v) for k, v in values.items() if k not in CADENCE_FIELDS}
    return values


@dataclass
class StageResult:
    """What a stage measured and made. `metrics` are written to `metrics.json` in the output
    folder, where the asset checks read them; `speed` (samples/s and the like) goes to the
    run's record only, so the same inputs give the same bytes; `examples` are (image, caption)
    rows to show; `tables` are lists of rows (dicts with the same keys) to show; `files` are
    JSON documents for the run's record; `curves` are the rows of the stage's DVC plots (a
    trainer's "loss": `TrainResult.curve`); `register` asks for a model version."""

    metrics: dict[str, float]
    speed: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    images: dict[str, Image.Image] = field(default_factory=dict)
    examples: list[tuple[Image.Image, str]] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    register: bool = False

    def save(self, folder: Path) -> None:
        """The result as files (JSON and PNGs), for the process that launched the stage."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, image in self.images.items():
            image.save(folder / f"image-{name}.png")
        for i, (image, _) in enumerate(self.examples):
            image.save(folder / f"example-{i}.png")
        document = {
            "metrics": self.metrics, "speed": self.speed, "metadata": self.metadata,
            "images": list(self.images), "examples": [caption for _, caption in self.examples],
            "tables": self.tables, "files": self.files, "curves": self.curves,
            "register": self.register,
        }  # fmt: skip
        write_json(folder / RESULT_FILE, document)

    @classmethod
    def load(cls, folder: Path) -> "StageResult":
        document = json.loads((folder / RESULT_FILE).read_text())
        images = {name: _png(folder / f"image-{name}.png") for name in document.pop("images")}
        examples = [
            (_png(folder / f"example-{i}.png"), caption)
            for i, caption in enumerate(document.pop("examples"))
        ]
        return cls(images=images, examples=examples, **document)


def _png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.copy()


@dataclass(frozen=True)
class Stage:
    """A stage: its name (the asset key), config dataclass, input assets and `run`."""

    name: str
    config: type
    inputs: tuple[str, ...]
    run: Callable[[Any, Inputs, Path, Log], StageResult]
    trains: bool = False  # uses every core: one at a time (see dalle3_dag.project)

    @property
    def module(self) -> str:
        """The module that holds the stage's code (`python -m` runs it)."""
        return getattr(self.run, "func", self.run).__module__


def read_metrics(folder: Path) -> dict[str, float]:
    return json.loads((Path(folder) / METRICS_FILE).read_text())


def run_stage(stage: Stage, cfg: Any, inputs: Inputs, out: Path, log: Log = NO_LOG) -> StageResult:
    """Run a stage into `out`, leaving its effective config and metrics beside what it made."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, to_dict(cfg))
    result = stage.run(cfg, inputs, out, log)
    write_json(out / METRICS_FILE, result.metrics)
    return result


class ConsoleLog:
    """A terminal's view of a stage: a tqdm bar per loop, figures as JSON lines and sample
    images in `folder`."""

    def __init__(self, folder: Path) -> None:
        from tqdm import tqdm

        self.folder, self.tqdm, self.bar = folder, tqdm, None

    def info(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def metrics(self, step: int, total: int, values: dict[str, float]) -> None:
        if self.bar is None or self.bar.total != total or step < self.bar.n:
            self.bar = self.tqdm(total=total, initial=step, file=sys.stderr)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "metrics.jsonl", "a") as file:
            file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    def image(self, name: str, image: Image.Image, step: int | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        image.save(self.folder / (f"{name}-step-{step}.png" if step is not None else f"{name}.png"))


def main(stages: Sequence[Stage], argv: Sequence[str] | None = None) -> None:
    """`python -m ml.stages.<module> --config FILE --out DIR`: one stage from the command line.

    Input folders default to `--assets/<input key>`; checkpoints go to `--work` (default
    `<out>.work`), logs, sample images and curves (`<name>.csv`) to `<out>.log`. Prints the
    result's metrics as JSON.
    """
    by_name = {stage.name: stage for stage in stages}
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__)
    if len(stages) > 1:
        parser.add_argument("--stage", required=True, choices=sorted(by_name))
    parser.add_argument("--config", type=Path, help="JSON or YAML of the stage's fields")
    parser.add_argument("--out", type=Path, required=True, help="the output folder")
    parser.add_argument("--assets", type=Path, default=Path("assets"), help="input assets root")
    parser.add_argument(
        "--input", action="append", default=[], metavar="KEY=DIR", help="one input's folder"
    )
    parser.add_argument("--work", type=Path, help="checkpoints (default: <out>.work)")
    parser.add_argument("--resume", choices=["latest", "none"], default="latest")
    parser.add_argument("--partition", action="append", default=[], dest="partitions")
    args = parser.parse_args(argv)
    stage = by_name[args.stage] if len(stages) > 1 else stages[0]
    folders = {key: args.assets / key for key in stage.inputs}
    for item in args.input:
        key, _, folder = item.partition("=")
        if key not in stage.inputs:
            parser.error(f"--input {item}: {stage.name} reads {list(stage.inputs)}")
        folders[key] = Path(folder)
    cfg = (
        load_config(stage.config, args.config, stage.name)
        if args.config
        else build_config(stage.config, {}, stage.name)
    )
    inputs = Inputs(
        folders,
        work=args.work or args.out.with_name(args.out.name + ".work"),
        resume=args.resume == "latest",
        partitions=args.partitions,
    )
    log = ConsoleLog(args.out.with_name(args.out.name + ".log"))
    result = run_stage(stage, cfg, inputs, args.out, log)
    for name, rows in result.curves.items():
        if rows:
            log.folder.mkdir(parents=True, exist_ok=True)
            write_csv(log.folder / f"{name}.csv", rows, list(rows[0]))
    print(json.dumps(result.metrics, sort_keys=True), flush=True)
