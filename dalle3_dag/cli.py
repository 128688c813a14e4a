"""`dalle3`: the project's command line, for what is not a Dagster materialization."""

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource

DAGSTER_BIN = str(Path(sys.executable).with_name("dagster"))
DAGSTER = [DAGSTER_BIN, "asset", "materialize", "-m", "dalle3_dag.definitions"]
DAGSTER_JOB = [DAGSTER_BIN, "job", "execute", "-m", "dalle3_dag.definitions", "-j"]


def _run(cmd: list[str], what: str) -> None:
    print(f"$ dagster {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"{what} failed")


def _materialize(select: str, partition: str | None = None) -> None:
    cmd = [*DAGSTER, "--select", select, *(["--partition", partition] if partition else [])]
    _run(cmd, f"materializing {select} {partition or ''}")


def run(args: argparse.Namespace) -> int:
    """Materialize assets with the Dagster CLI in graph order, partitioned ones shard by shard.

    `dagster asset materialize` takes one partition per run, so unpartitioned assets run
    together and each shard partition gets its own run (`--jobs` at a time): a failed shard
    fails alone and a rerun only redoes what is missing.
    """
    import dagster as dg

    from dalle3_dag.definitions import defs

    graph = defs.resolve_asset_graph()
    selected = dg.AssetSelection.from_coercible(args.select).resolve(graph)
    if dg.AssetKey("raw_pairs") in selected:
        # Record the source's current version first, so the UI can tell when new or changed
        # shards make raw_pairs stale.
        _run([*DAGSTER_JOB, "observe_sources"], "observing raw_pairs_source")
    batch: list[str] = []
    for key in graph.toposorted_asset_keys:
        if key not in selected:
            continue
        partitions_def = graph.get(key).partitions_def
        if partitions_def is None:
            batch.append(key.to_user_string())
            continue
        if batch:
            _materialize(",".join(batch))
            batch = []
        with dg.DagsterInstance.get() as instance:
            partitions = partitions_def.get_partition_keys(dynamic_partitions_store=instance)
        if not partitions:
            raise SystemExit(f"{key.to_user_string()} has no partitions yet: run its upstream")
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda p, k=key: _materialize(k.to_user_string(), p), partitions))
    if batch:
        _materialize(",".join(batch))
    return summary(args) if args.summary else 0


def summary(_: argparse.Namespace) -> int:
    """Print what has been materialized, where it lives, and how to look at it."""
    from dalle3_dag.definitions import defs

    storage, dvc = StorageResource(), DvcResource()
    graph = defs.resolve_asset_graph()
    print(f"{'asset':24} {'group':14} {'dvc hash':38} path")
    for spec in sorted(defs.resolve_all_asset_specs(), key=lambda s: s.key.to_user_string()):
        if not graph.get(spec.key).is_materializable:  # raw_pairs_source is only observed
            continue
        key = spec.key.to_user_string()
        path = storage.asset_dir(key)
        shown = str(path) if path.exists() else "(not materialized)"
        print(f"{key:24} {spec.group_name or '':14} {dvc.out_hash(key) or '-':38} {shown}")
    print(f"\nMLflow tracking: {MlflowResource().resolved_uri()}")
    print(
        "UIs: `make ui`, then Dagster at http://127.0.0.1:3000 and MLflow at http://127.0.0.1:5000"
    )
    print("Versions: `dvc status` (should be clean), `dvc push` to send assets to the remote")
    return 0


def caption(args: argparse.Namespace) -> int:
    """Print the SSC and DSC captions of image files, with the materialized captioners."""
    from PIL import Image

    from ml.captioner.stages import ImageCaptioner

    storage = StorageResource()
    needed = ["clip_encoder", "captioner_ssc", "captioner_dsc"]
    missing = [key for key in needed if not storage.asset_dir(key).exists()]
    if missing:
        raise SystemExit(f"not materialized yet: {', '.join(missing)} (run `make run`)")
    images = []
    for path in args.images:
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as err:
            raise SystemExit(f"cannot read image {path}: {err}") from err
    for stage in ("ssc", "dsc"):
        captioner = ImageCaptioner(
            storage.asset_dir("clip_encoder"), storage.asset_dir(f"captioner_{stage}")
        )
        for path, text in zip(args.images, captioner(images), strict=True):
            print(f"{path}\t{stage}\t{text}")
    return 0


MODELS = {"distilled": ("distilled_model", 2), "teacher": ("diffusion_model", 25)}


def generate(args: argparse.Namespace) -> int:
    """Write a grid of K images for one prompt, sampled with a materialized model."""
    import torch

    from ml.diffusion.pipeline import TextToImagePipeline
    from ml.viz import image_grid

    key, default_steps = MODELS[args.model]
    folder = StorageResource().asset_dir(key)
    if not (folder / "model_index.json").is_file():
        raise SystemExit(
            f"no {args.model} model materialized at {folder}: run `make run` "
            f"(or `dalle3 run --select +{key}`)"
        )
    if args.n < 1:
        raise SystemExit(f"-n must be at least 1, got {args.n}")
    steps = args.steps or default_steps
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = TextToImagePipeline.from_pretrained(folder).to(device)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([args.prompt] * args.n, steps, args.guidance, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=min(args.n, 8), scale=4).save(args.out)
    version = DvcResource().out_hash(key) or "not versioned"
    print(f"model: {key} at {folder} (dvc {version}), {steps} steps, guidance {args.guidance}")
    print(f"wrote {args.n} image(s) for {args.prompt!r} (seed {args.seed}) to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dalle3", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("summary", help=summary.__doc__).set_defaults(func=summary)
    caption_parser = commands.add_parser("caption", help=caption.__doc__)
    caption_parser.add_argument("images", nargs="+", help="image files")
    caption_parser.set_defaults(func=caption)
    gen = commands.add_parser("generate", help=generate.__doc__)
    gen.add_argument("prompt")
    gen.add_argument("--model", choices=sorted(MODELS), default="distilled")
    gen.add_argument("--steps", type=int, help="sampling steps (default: 2 distilled, 25 teacher)")
    gen.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("-n", type=int, default=4, help="images in the grid")
    gen.add_argument("--out", type=Path, required=True, help="PNG file to write")
    gen.set_defaults(func=generate)
    run_parser = commands.add_parser("run", help="materialize assets, shard partitions included")
    run_parser.add_argument("--select", default="*", help="Dagster asset selection")
    run_parser.add_argument("--jobs", type=int, default=2, help="shard partitions at a time")
    run_parser.add_argument("--summary", action="store_true", help="print `dalle3 summary` after")
    run_parser.set_defaults(func=run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
