"""`dalle3 run`'s console: Dagster's INFO and above, one short line each; everything in the log."""

import sys
from pathlib import Path

import pytest

from dalle3_dag.cli import RunLog, print_verdicts
from ml.data.shapeworld import Scene, SceneObject, render

PREFIX = "2026-12-02 02:43:22 +0000 - dagster - {} - __ASSET_JOB - 1f2e - clip_encoder - "
LINES = [
    PREFIX.format("DEBUG") + "STEP_START - Started execution of step",
    PREFIX.format("INFO") + "clip_encoder: step 150/1600 (9%), loss 1.25, ETA 15:48",
    "2026/12/02 02:42:59 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
    PREFIX.format("ERROR") + "STEP_FAILURE - Execution of step failed.",
    "Traceback (most recent call last):",
    '  File "x.py", line 1',
]


def test_the_console_shows_info_and_errors_with_their_tracebacks(tmp_path: Path, capsys) -> None:
    log = RunLog(tmp_path / "logs" / "run.log")
    for line in LINES:
        log.show(line)
    shown = capsys.readouterr().out.splitlines()
    assert shown == [
        "02:43:22 INFO    clip_encoder: step 150/1600 (9%), loss 1.25, ETA 15:48",
        "02:43:22 ERROR   Execution of step failed.",
        "    Traceback (most recent call last):",
        '      File "x.py", line 1',
    ]


def test_a_failed_command_says_why_and_keeps_everything_in_the_log(tmp_path: Path, capsys):
    log = RunLog(tmp_path / "run.log")
    script = "import sys; print('loading failed: no module named x'); sys.exit(3)"
    with pytest.raises(SystemExit, match="materializing x failed"):
        log.command([sys.executable, "-c", script], "materializing x")
    assert "loading failed: no module named x" in capsys.readouterr().out
    (tmp_path / "debug.txt").write_text(LINES[0])
    log.command(
        [sys.executable, "-c", f"print(open({str(tmp_path / 'debug.txt')!r}).read())"], "quiet"
    )
    assert "STEP_START" not in capsys.readouterr().out
    text = (tmp_path / "run.log").read_text()
    assert "loading failed" in text and "STEP_START" in text


def test_generate_prints_the_instruments_verdict_on_each_image(capsys) -> None:
    right = Scene("gray", "plain", (SceneObject("circle", "red", "large", "top left"),))
    wrong = Scene("gray", "plain", (SceneObject("circle", "blue", "large", "top left"),))
    print_verdicts("a red circle in the top left", [render(right, 32), render(wrong, 32)])
    assert capsys.readouterr().out.splitlines() == [
        "1 of 2 image(s) follow 'a red circle in the top left' (ml.eval.scene_reader):",
        "  1: follows: gray background, large red circle top left",
        "  2: does not: gray background, large blue circle top left",
    ]
    print_verdicts("a photo of a dog", [render(right, 32)])
    assert capsys.readouterr().out.startswith("not judged: 'a photo of a dog' names no shape")
