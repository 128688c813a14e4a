"""What the `dalle3` commands accept: each bad value refused in one line naming it, exit code 2,
before any model loads."""

import argparse
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

from PIL import Image

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (`dalle3 generate: argument --steps: ...`)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed(text: str) -> int:
    value = _whole(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 1], got {value}")
    return value


def prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty")
    return text


def image_file(text: str) -> Path:
    """A path to write an image to: a file name with an image format's suffix, whose nearest
    existing folder is writable (missing folders below it are made)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name such as grid.png")
    formats = Image.registered_extensions()
    if formats.get(path.suffix.lower()) not in Image.SAVE:
        raise argparse.ArgumentTypeError(
            f"{text}: {path.suffix or 'no suffix'} is not an image format (use .png or .jpg)"
        )
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {folder}")
    return path
