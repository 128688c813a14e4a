"""`dalle3 run`'s console: Dagster's INFO and above, one short line each; everything in the log."""

import sys
from pathlib import Path

import pytest

from dalle3_dag.cli import RunLog

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
