"""`dalle3`: the project's command line, for what is not a Dagster materialization."""

import argparse
import fcntl
import functools
import itertools
import json
import operator
import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from dalle3_dag import arguments
from dalle3_dag.arguments import Parser
from dalle3_dag.resources import DvcResource, MlflowResource, StorageResource
from ml.files import write_atomic

DAGSTER_BIN = str(Path(sys.executable).with_name("dagster"))
DAGSTER = [DAGSTER_BIN, "asset", "materialize", "-m", "dalle3_dag.definitions"]
DAGSTER_JOB = [DAGSTER_BIN, "job", "execute", "-m", "dalle3_dag.definitions", "-j"]


# A line of Dagster's console log: time, level, then " - "-separated fields, message last.
RECORD = re.compile(r"^\S+ (\d\d:\d\d:\d\d) \S+ - dagster - ([A-Z]+) - (.*)$")
QUIET = ("DEBUG",)
# Lines of a record shown with it (tracebacks); other lines between records only go to the log.
LOUD = ("WARNING", "ERROR", "CRITICAL")


class RunLog:
    """What `dalle3 run` shows: Dagster's INFO and above, one short line each, while every
    line of every command goes to a log file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.file = path, open(path, "a")  # noqa: SIM115
        self.loud = False

    def command(self, cmd: list[str], what: str) -> None:
        print(f"$ {Path(cmd[0]).name} {' '.join(cmd[1:])}", flush=True)
        self.file.write(f"$ {' '.join(cmd)}\n")
        started, last = time.monotonic(), deque(maxlen=40)
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            for line in proc.stdout:
                self.file.write(line)
                last.append(line)
                self.show(line.rstrip("\n"))
        self.file.flush()
        if proc.returncode != 0:
            print("".join(last), end="", flush=True)
            raise SystemExit(f"{what} failed (full log: {self.path})")
        print(f"  {what}: done in {time.monotonic() - started:.0f} s", flush=True)

    def show(self, line: str) -> None:
        record = RECORD.match(line)
        if record is None:  # a continuation line: shown with a warning or error it belongs to
            if self.loud and line.strip():
                print(f"    {line}", flush=True)
            return
        clock, level, rest = record.groups()
        self.loud = level in LOUD
        if level not in QUIET:
            print(f"{clock} {level:7} {rest.rsplit(' - ', 1)[-1]}", flush=True)


def run(args: argparse.Namespace) -> int:
    """Materialize what is missing or stale (everything with --force) with the Dagster CLI, in
    graph order: unpartitioned assets together, a partitioned one in a run per span of its
    partitions.

    The console shows Dagster's INFO lines (each asset's start, progress and figures); the
    full DEBUG log goes to `logs/run-<time>.log`.
    """
    from dalle3_dag.project import PROJECT_DIR

    started = time.monotonic()
    # first of all: loading the definitions opens the instance, which creates its storage
    lock = hold_project(Path(os.environ.get("DAGSTER_HOME") or PROJECT_DIR / ".dagster"))
    import dagster as dg

    dg.DagsterInstance.get().dispose()  # its storage made here, under the lock, not in a race
    from dalle3_dag.definitions import defs
    from dalle3_dag.rebuild import Rebuild, spans
    from ml.speed_probe import describe, probe

    log = RunLog(PROJECT_DIR / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log")
    print(f"full log: {log.path}", flush=True)
    print(describe(probe()), flush=True)  # beside the wall time below
    from dalle3_dag.ablation import PRODUCTION

    graph = defs.resolve_asset_graph()
    selection = PRODUCTION
    if args.select:  # comma-separated clauses, as `dagster asset materialize --select` takes
        clauses = [dg.AssetSelection.from_coercible(c) for c in args.select.split(",")]
        selection = functools.reduce(operator.or_, clauses)
    selected = selection.resolve(graph)
    if dg.AssetKey("raw_pairs") in selected:
        # Record the source's current version first, so new or changed shards make raw_pairs
        # stale (here and in the UI).
        log.command([*DAGSTER_JOB, "observe_sources"], "observing raw_pairs_source")
    with dg.DagsterInstance.get() as instance:
        rebuild, batch, fresh = Rebuild(instance, graph, args.force), [], []

        def flush() -> None:
            if batch:
                log.command([*DAGSTER, "--select", ",".join(batch)], ", ".join(batch))
                batch.clear()
                rebuild.refresh()

        for key in graph.toposorted_asset_keys:
            if key not in selected or not graph.get(key).is_materializable:
                continue
            name, partitions_def = key.to_user_string(), graph.get(key).partitions_def
            if partitions_def is not None:
                flush()  # its partitions and their status follow from what ran above
                every = partitions_def.get_partition_keys(dynamic_partitions_store=instance)
                if not every:
                    raise SystemExit(f"{name} has no partitions yet: run its upstream")
            chosen = rebuild.partitions(key)
            if not chosen:
                fresh.append(name)
            elif partitions_def is None:
                batch.append(name)
            elif one_run_each(graph.get(key)):
                for partition in chosen:
                    cmd = [*DAGSTER, "--select", name, "--partition", partition]
                    log.command(cmd, f"{name} [{partition}]")
                rebuild.refresh()
            else:
                for first, last in spans(chosen, every):
                    span = f"{first}...{last}"
                    cmd = [*DAGSTER, "--select", name, "--partition-range", span]
                    log.command(cmd, f"{name} [{span}]")
                rebuild.refresh()
        flush()
    if fresh:
        print(f"up to date, not rerun: {', '.join(fresh)}", flush=True)
    print(f"dalle3 run: {(time.monotonic() - started) / 60:.1f} min wall", flush=True)
    lock.close()
    return summary(args) if args.summary else 0


def hold_project(home: Path) -> TextIO:
    """The project's `dalle3 run` lock, open (the OS releases it when the process ends, however
    it ends): two runs at once would race to create the Dagster instance's storage and
    interleave their writes to the asset store and dvc.lock, so the second stops at once."""
    home.mkdir(parents=True, exist_ok=True)
    lock = open(home / "dalle3-run.lock", "a+")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise SystemExit(
            f"dalle3 run: this project is being run by {holder}; wait for it to end or stop it"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"dalle3 run (pid {os.getpid()}, started {time.strftime('%H:%M:%S')})")
    lock.flush()
    return lock


def one_run_each(node: Any) -> bool:
    """Whether the asset's partitions run one per run (their backfill policy), as the
    ablation's trainings do, rather than a span in one run."""
    policy = node.backfill_policy
    return policy is not None and policy.max_partitions_per_run == 1


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
    evaluation = storage.asset_dir("clip_s_eval") / "metrics.json"
    if evaluation.is_file():
        print_evaluation(json.loads(evaluation.read_text()))
    print(f"\nMLflow tracking: {MlflowResource().resolved_uri()}")
    print(
        "UIs: `make ui`, then Dagster at http://127.0.0.1:3000 and MLflow at http://127.0.0.1:5000"
    )
    print("Versions: `dvc status` (clean but for the ablations until `make ablation`), `dvc push`")
    return 0


def print_evaluation(metrics: dict[str, float]) -> None:
    """clip_s_eval's figures: prompt following by category, then CLIP-S."""
    from ml.data.shapeworld import EVAL_CATEGORIES
    from ml.stages.clip_s_eval import SINGLE, STYLES

    names = (*EVAL_CATEGORIES, "overall", *SINGLE)
    columns = [c for c in names if f"teacher_short_{c}_accuracy" in metrics]
    if columns:
        print("\nclip_s_eval: share of images that follow their prompt (GenEval-style)")
        print(f"{'model':8} {'prompts':12} " + " ".join(f"{c[:12]:>12}" for c in columns))
        for model, style in itertools.product(("teacher", "student"), STYLES):
            if f"{model}_{style}_overall_accuracy" not in metrics:
                continue
            cells = [f"{metrics[f'{model}_{style}_{c}_accuracy']:>12.3f}" for c in columns]
            print(f"{model:8} {style:12} " + " ".join(cells))
    print(f"\n{'CLIP-S':8} {'captions':12} {'paper':>12} {'hessel':>12}")
    for model, setting in itertools.product(("teacher", "student"), ("alt", "descriptive")):
        if f"{model}_clip_s_paper_{setting}" in metrics:
            paper, hessel = (metrics[f"{model}_clip_s_{v}_{setting}"] for v in ("paper", "hessel"))
            print(f"{model:8} {setting:12} {paper:>12.2f} {hessel:>12.3f}")


def caption(args: argparse.Namespace) -> int:
    """Print the SSC and DSC captions of image files, with the materialized captioners."""
    from PIL import Image

    from ml.captioner.generate import ImageCaptioner

    images = []
    for path in args.images:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as err:
            raise SystemExit(f"dalle3 caption: cannot read image {path}: {err}") from err
    storage = StorageResource()
    needed = ["clip_encoder", "captioner_ssc", "captioner_dsc"]
    missing = [key for key in needed if not storage.asset_dir(key).exists()]
    if missing:
        raise SystemExit(f"not materialized yet: {', '.join(missing)} (run `make run`)")
    for stage in ("ssc", "dsc"):
        captioner = ImageCaptioner(
            storage.asset_dir("clip_encoder"), storage.asset_dir(f"captioner_{stage}")
        )
        for path, text in zip(args.images, captioner(images), strict=True):
            print(f"{path}\t{stage}\t{text}")
    return 0


def clip_score(args: argparse.Namespace) -> int:
    """Score image-caption pairs with CLIP-S; the mean is the last line printed."""
    from ml.clip import load_clip
    from ml.eval.clip_score import clip_score as score_pairs
    from ml.eval.clip_score import read_pairs, write_per_pair

    folder = Path(args.model.removeprefix("local-dir:")) if args.model else None
    folder = folder or StorageResource().asset_dir("clip_encoder")
    try:  # bad input is named before the model loads
        names, images, captions = read_pairs(args.images, args.captions)
        model, preprocess, tokenizer = load_clip(folder)
    except (OSError, ValueError) as err:
        raise SystemExit(f"dalle3 clip-score: {err}") from err
    score = score_pairs(model, preprocess, tokenizer, images, captions, args.variant)
    out = args.out or args.captions.with_name(f"{args.captions.stem}.clip_s_{args.variant}.jsonl")
    write_per_pair(out, names, captions, score)
    print(f"model: {folder}; {len(captions)} pairs; per-pair scores in {out}")
    print(f"CLIP-S ({args.variant}): {score.score:.4f}")
    return 0


MODELS = {"distilled": ("distilled_model", 2), "teacher": ("diffusion_model", 25)}


def upsample(prompt: str, backend: str, seed: int) -> str:
    """The prompt rewritten by the materialized upsampler or the configured chat endpoint,
    printed with the backend that wrote it."""
    from dalle3_dag.project import resolve
    from ml.upsampler import load_upsampler
    from ml.upsampler.chat import UpsamplerError
    from ml.upsampler.config import UPSAMPLER_CHAT, ChatConfig

    folder = StorageResource().asset_dir("prompt_upsampler")
    if backend == "local" and not (folder / "config.json").is_file():
        raise SystemExit(
            f"no prompt_upsampler materialized at {folder}: run `make run` "
            "(or `dalle3 run --select +prompt_upsampler`), or use --upsampler openai"
        )
    chat = resolve(ChatConfig, UPSAMPLER_CHAT)[0]
    try:
        upsampler = load_upsampler(folder, backend, chat, log=lambda m: print(m, file=sys.stderr))
        text = upsampler([prompt], seed=seed)[0]
    except UpsamplerError as err:
        raise SystemExit(f"dalle3 generate --upsample: {err}") from err
    print(f"upsampled ({backend}): {text}")
    return text


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
    steps = args.steps or default_steps
    prompt = upsample(args.prompt, args.upsampler, args.seed) if args.upsample else args.prompt
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = TextToImagePipeline.from_pretrained(folder).to(device)
    pipe.set_progress_bar_config(disable=True)
    tokens, limit = len(pipe.tokenizer(prompt).input_ids), pipe.tokenizer.model_max_length
    if tokens > limit:
        print(f"warning: the prompt is {tokens} tokens; the text encoder reads the first {limit}",
              file=sys.stderr)  # fmt: skip
    images = pipe([prompt] * args.n, steps, args.guidance, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=min(args.n, 8), scale=4).save(args.out)
    version = DvcResource().out_hash(key) or "not versioned"
    print(f"model: {key} at {folder} (dvc {version}), {steps} steps, guidance {args.guidance}")
    print(f"wrote {args.n} image(s) for {prompt!r} (seed {args.seed}) to {args.out}")
    print_verdicts(args.prompt, images)
    return 0


def print_verdicts(prompt: str, images: list[Any]) -> None:
    """The instrument's verdict on each image, when the prompt is one the world can judge."""
    from ml.eval.oracle import follows, prompt_asks
    from ml.eval.scene_reader import read_scene

    asks = prompt_asks(prompt)
    if asks is None:
        print(f"not judged: {prompt!r} names no shape ShapeWorld draws")
        return
    readings = [read_scene(image) for image in images]
    verdicts = [follows(reading, asks) for reading in readings]
    print(f"{sum(verdicts)} of {len(images)} image(s) follow {prompt!r} (ml.eval.scene_reader):")
    for k, (reading, verdict) in enumerate(zip(readings, verdicts, strict=True), 1):
        seen = ", ".join(f"{o.size} {o.color} {o.shape} {o.position}" for o in reading.objects)
        word = f', the word "{reading.word}"' if reading.word else ""
        print(f"  {k}: {'follows' if verdict else 'does not'}: {reading.background} "
              f"background, {seen or 'no object'}{word}")  # fmt: skip


ABLATION_START = "<!-- ablation_report: written by `dalle3 results`; edit above or below -->"
ABLATION_END = "<!-- end of ablation_report -->"


def results(args: argparse.Namespace) -> int:
    """Copy the materialized ablation report (findings, table, figures) into a results page,
    between its markers (appended the first time), the figures into a folder beside it."""
    import shutil

    from ml.stages.ablation_report import REPORT

    folder = StorageResource().asset_dir("ablation_report")
    if not (folder / REPORT).is_file():
        raise SystemExit(f"no ablation_report materialized at {folder}: run `make ablation`")
    page: Path = args.page
    figures = page.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    report = (folder / REPORT).read_text()
    for image in sorted(folder.glob("*.png")):
        shutil.copyfile(image, figures / f"ablation-{image.name}")
        report = report.replace(f"]({image.name})", f"](figures/ablation-{image.name})")
    version = DvcResource().out_hash("ablation_report") or "not versioned"
    section = f"{ABLATION_START}\n*ablation_report, DVC {version}*\n\n{report}{ABLATION_END}"
    text = page.read_text() if page.is_file() else "# Results\n"
    if ABLATION_START in text:
        before, _, rest = text.partition(ABLATION_START)
        text = before + section + rest.partition(ABLATION_END)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_atomic(page, text.encode())
    print(f"wrote the ablation report into {page}, its figures into {figures}")
    return 0


def dvc_yaml(args: argparse.Namespace) -> int:
    """Write dvc.yaml from the asset definitions (or, with --check, fail if it differs)."""
    from dalle3_dag.definitions import STAGES  # builds the assets
    from dalle3_dag.factory import dvc_yaml as render
    from dalle3_dag.project import PROJECT_DIR

    path, text = PROJECT_DIR / "dvc.yaml", render([stage.name for stage in STAGES])
    if args.check:
        if path.read_text() != text:
            print(f"{path} is out of date: run `dalle3 dvc-yaml`", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="dalle3", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("summary", help=summary.__doc__).set_defaults(func=summary)
    dvc_parser = commands.add_parser("dvc-yaml", help=dvc_yaml.__doc__)
    dvc_parser.add_argument("--check", action="store_true", help="only check it is current")
    dvc_parser.set_defaults(func=dvc_yaml)
    caption_parser = commands.add_parser("caption", help=caption.__doc__)
    caption_parser.add_argument("images", nargs="+", help="image files")
    caption_parser.set_defaults(func=caption)
    score = commands.add_parser("clip-score", help=clip_score.__doc__)
    score.add_argument("--images", type=Path, required=True, help="folder of the images")
    score.add_argument(
        "--captions", type=Path, required=True, help='JSONL: {"image": NAME, "caption": TEXT}'
    )
    score.add_argument("--variant", choices=["paper", "hessel"], default="paper")
    score.add_argument(
        "--model", help="open_clip folder (local-dir:PATH); default: the clip_encoder asset"
    )
    score.add_argument("--out", type=Path, help="per-pair scores, .jsonl or .csv")
    score.set_defaults(func=clip_score)
    gen = commands.add_parser("generate", help=generate.__doc__)
    gen.add_argument("prompt", type=arguments.prompt)
    gen.add_argument("--model", choices=sorted(MODELS), default="distilled")
    gen.add_argument(
        "--steps", type=arguments.positive, help="sampling steps (default: 2 distilled, 25 teacher)"
    )
    gen.add_argument(
        "--guidance", type=arguments.finite, default=3.0, help="classifier-free guidance scale"
    )
    gen.add_argument("--seed", type=arguments.seed, default=0)
    gen.add_argument("-n", type=arguments.positive, default=4, help="images in the grid")
    gen.add_argument("--out", type=arguments.image_file, required=True, help="image file to write")
    gen.add_argument(
        "--upsample", action="store_true", help="rewrite the prompt as a descriptive caption first"
    )
    gen.add_argument(
        "--upsampler",
        choices=["local", "openai"],
        default="local",
        help="local: the prompt_upsampler asset; openai: params.yaml's upsampler_chat",
    )
    gen.set_defaults(func=generate)
    results_parser = commands.add_parser("results", help=results.__doc__)
    results_parser.add_argument("--page", type=Path, default=Path("docs/results.md"))
    results_parser.set_defaults(func=results)
    run_parser = commands.add_parser(
        "run", help="materialize what is missing or stale, shard partitions included"
    )
    run_parser.add_argument(
        "--select", help="Dagster asset selection (default: the pipeline, not the ablations)"
    )
    run_parser.add_argument("--summary", action="store_true", help="print `dalle3 summary` after")
    run_parser.add_argument(
        "--force", action="store_true", help="rerun every selected asset, stale or not"
    )
    run_parser.set_defaults(func=run)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # a failure is one line; --debug shows where it came from
        if args.debug:
            raise
        print(f"dalle3 {args.command}: {type(err).__name__}: {err} (--debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
