"""Shared test fixtures."""

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from moto.server import ThreadedMotoServer

from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource
from ml.data.sample import Sample
from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.data.shards import write_shards


def tiny_vae(directory: Path, seed: int = 0) -> Path:
    """A random 2-level AutoencoderKL (16 px -> 4x8x8 latents) saved in `directory`, its weights
    set by `seed` alone."""
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
        )
    vae.save_pretrained(directory)
    return directory


class RecordingLog:
    """An `ml.stage.Log` that keeps what a stage reports."""

    def __init__(self) -> None:
        self.figures: list[tuple[int, int, dict[str, float]]] = []
        self.images: list[tuple[str, int | None]] = []

    def info(self, message: str) -> None:
        pass

    def metrics(self, step: int, total: int, values: dict[str, float]) -> None:
        self.figures.append((step, total, values))

    def image(self, name: str, image: Any, step: int | None = None) -> None:
        self.images.append((name, step))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """An in-process S3-compatible server (moto), so S3 code runs against real HTTP calls.

    Yields its endpoint URL. Dummy credentials keep boto3 from looking for real ones.
    """
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


REPO = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train and sample on one thread: as fast for tiny models, and on a shared CPU a second
    thread stalls at every barrier whenever a neighbour holds its core (measured: 10x slower).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The CI profile (profiles/ci.yaml): every split, a few shards each, tiny models, open floors.
SMALL_PARAMS = yaml.safe_load((REPO / "profiles" / "ci.yaml").read_text())


def write_web_shards(
    folder: Path, n: int, shard_size: int = 20, captioned_every: int = 3, seed: int = 7
) -> None:
    """Shards as img2dataset writes them, with no ShapeWorld ground truth: `.jpg`, `.txt`
    alt-text, `.json` with url/key/caption, and on every `captioned_every`-th sample two
    human-written captions (`human_short`, `human_long`, as --save_additional_columns would)."""
    samples = []
    for i, sample in enumerate(generate(n, seed=seed, cfg=ShapeWorldConfig(), split="web")):
        meta = {"url": f"https://example.com/{i}.jpg", "key": sample.key, "caption": sample.text}
        if i % captioned_every == 0:
            meta |= {
                "human_short": sample.meta["short_caption"],
                "human_long": sample.meta["descriptive_caption"],
            }
        samples.append(Sample(sample.key, sample.image, sample.text, meta))
    write_shards(samples, folder, shard_size=shard_size, image_format="jpg")


# raw_pairs run config for a folder made by write_web_shards
def web_source(folder: Path) -> dict[str, Any]:
    return {
        "source": "webdataset",
        "uri": str(folder),
        "fractions": {"train": 0.6, "clip": 0.2, "eval": 0.2},
        "labelled": {"short_field": "human_short", "descriptive_field": "human_long"},
    }


@dataclass
class Project:
    """A throwaway copy of the project: its own params, DVC repo, MLflow store and assets."""

    root: Path
    storage: StorageResource
    mlflow: MlflowResource
    dvc: DvcResource

    @property
    def resources(self) -> dict[str, Any]:
        return {"storage": self.storage, "mlflow_tracker": self.mlflow, "dvc": self.dvc}

    def env(self) -> dict[str, str]:
        """Environment that points the Dagster and DVC CLIs at this project."""
        return {
            **os.environ,
            "DALLE3_PROJECT_DIR": str(self.root),
            "DALLE3_PARAMS": str(self.root / "params.yaml"),
            "DAGSTER_HOME": str(self.root / ".dagster"),
            "MLFLOW_TRACKING_URI": self.mlflow.resolved_uri(),
        }


def make_project(root: Path) -> Project:
    """A throwaway project at `root`: the code linked, the CI profile, its own DVC repo and
    Dagster instance."""
    root.mkdir(parents=True)
    for name in ("ml", "dalle3_dag", "pyproject.toml"):
        (root / name).symlink_to(REPO / name)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(SMALL_PARAMS))
    (root / ".dagster").mkdir()
    shutil.copy(REPO / "dagster.yaml", root / ".dagster" / "dagster.yaml")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    return Project(
        root=root,
        storage=StorageResource(root=str(root / "assets")),
        mlflow=MlflowResource(project_dir=str(root)),
        dvc=DvcResource(repo_dir=str(root)),
    )


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    made = make_project(tmp_path / "project")
    monkeypatch.setenv("DALLE3_PARAMS", str(made.root / "params.yaml"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return made
