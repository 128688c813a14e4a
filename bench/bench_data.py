"""Data-layer benchmark: ShapeWorld generation and shard read throughput, and the peak memory
of the whole toy graph (`make run` under /usr/bin/time -v).

    python bench/bench_data.py [--samples 4096] [--make-run]
"""

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

from ml.data.shapeworld import ShapeWorldConfig, generate
from ml.data.shards import ReadStats, read_shards, write_shards
from ml.speed_probe import describe, probe

REPO = Path(__file__).resolve().parents[1]


def report(label: str, n: int, start: float) -> None:
    seconds = time.perf_counter() - start
    print(f"{label:44} {n / seconds:8.0f} samples/s ({n} in {seconds:.2f} s)")


def bench_data(samples: int, shard_size: int) -> None:
    cfg = ShapeWorldConfig()
    start = time.perf_counter()
    generated = list(generate(samples, seed=0, cfg=cfg, split="bench"))
    report("ShapeWorld generation (32x32, render only)", samples, start)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_shards(generated, Path(tmp), shard_size)
        report("shard write (PNG + tar)", samples, start)
        stats = ReadStats()
        start = time.perf_counter()
        n = sum(1 for _ in read_shards(tmp, stats))
        report("shard read (stream + PNG decode)", n, start)
        assert n == samples and stats.skipped_images == 0


def bench_make_run() -> None:
    proc = subprocess.run(["/usr/bin/time", "-v", "make", "-C", str(REPO), "run"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"make run failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", proc.stderr)[1]
    # time -v reports the largest single process of the tree: Dagster runs each step in its
    # own process, so this is the peak of the heaviest step or of the orchestrator.
    print(f"make run: wall {wall}, peak RSS of the largest process {peak_kb / 2**20:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--make-run", action="store_true", help="also time `make run`")
    args = parser.parse_args()
    print(describe(probe()))
    bench_data(args.samples, args.shard_size)
    if args.make_run:
        bench_make_run()


if __name__ == "__main__":
    main()
