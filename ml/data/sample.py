"""The one in-memory record every data stage passes around."""

from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass
class Sample:
    key: str
    image: Image.Image
    text: str
    meta: dict[str, Any]
