"""`dalle3 run`'s console: Dagster's INFO and above, one short line each; everything in the log."""

import json
import sys
from pathlib import Path

import pytest

from dalle3_dag.cli import RunLog, main, print_verdicts
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


# --- bad input: one line naming it, exit 2 for usage, 1 for failures, before any model loads --


def bomb(path: Path) -> Path:
    """A PNG whose header declares 30000 x 30000 pixels (a decompression bomb)."""
    import struct
    import zlib

    render(Scene("gray", "plain", ()), 8).save(path)
    data = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", 30000, 30000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(data))
    return path


GENERATE_REFUSALS = [
    (["--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
    (["--guidance", "inf"], "argument --guidance: must be a finite number, got 'inf'"),
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--steps", "-1"], "argument --steps: must be at least 1, got -1"),
    (["--seed", str(2**64)], f"argument --seed: must be in [0, 2**63 - 1], got {2**64}"),
    (["-n", "0"], "argument -n: must be at least 1, got 0"),
]


@pytest.mark.parametrize(("extra", "line"), GENERATE_REFUSALS)
def test_generate_refuses_a_bad_value_in_one_line(extra, line, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a red circle", "--out", str(tmp_path / "g.png"), *extra])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"dalle3 generate: {line}"]
    assert not (tmp_path / "g.png").exists()


def test_generate_refuses_bad_prompts_and_output_paths(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("")
    cases = [
        (["", "--out", "g.png"], "argument prompt: the prompt is empty"),
        (["  ", "--out", "g.png"], "argument prompt: the prompt is empty"),
        (["a circle", "--out", str(tmp_path)], f"{tmp_path} is a folder; give a file name"),
        (["a circle", "--out", "g.txt"], "g.txt: .txt is not an image format"),
        (["a circle", "--out", "g"], "g: no suffix is not an image format"),
        (["a circle", "--out", str(tmp_path / "file" / "g.png")], f"cannot write in {tmp_path}"),
    ]
    for args, words in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["generate", *args])
        (error,) = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 2 and error.startswith("dalle3 generate: ") and words in error


def test_clip_score_refuses_paths_outside_its_folder_and_bombs(tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    render(Scene("gray", "plain", ()), 8).save(images / "ok.png")
    bomb(images / "bomb.png")
    cases = {
        "../../../etc/passwd": 'pairs.jsonl:2: "image" must name a file inside',
        "/etc/shadow": 'pairs.jsonl:2: "image" must name a file inside',
        "bomb.png": "pairs.jsonl:2: cannot read image",
    }
    for name, words in cases.items():
        pairs = tmp_path / "pairs.jsonl"
        rows = [{"image": "ok.png", "caption": "a"}, {"image": name, "caption": "b"}]
        pairs.write_text("\n".join(json.dumps(row) for row in rows))
        with pytest.raises(SystemExit) as exit_:
            main(["clip-score", "--images", str(images), "--captions", str(pairs)])
        assert words in str(exit_.value.code)
        assert "Traceback" not in capsys.readouterr().err


def test_caption_names_a_decompression_bomb(tmp_path) -> None:
    with pytest.raises(SystemExit, match=r"dalle3 caption: cannot read image .*bomb\.png"):
        main(["caption", str(bomb(tmp_path / "bomb.png"))])


def test_a_failure_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys) -> None:
    def broken(_: object) -> int:
        raise OSError("weights truncated: model.safetensors")

    monkeypatch.setattr("dalle3_dag.cli.summary", broken)
    assert main(["summary"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "dalle3 summary: OSError: weights truncated: model.safetensors (--debug for the traceback)"
    ]
    with pytest.raises(OSError, match="weights truncated"):
        main(["--debug", "summary"])
