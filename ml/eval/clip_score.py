"""CLIP-S: how well captions describe their images, as the cosine of CLIP embeddings.

Two published variants go by the same name, so each is reported under its own:
- `paper`: DALL·E 3's (section 4.1), the mean cosine x 100;
- `hessel`: Hessel et al. 2021's, the mean of 2.5 * max(cos, 0) with every caption prefixed
  "A photo depicts ", and RefCLIP-S where reference captions are given: per pair, the harmonic
  mean of CLIP-S and the caption's best cosine (clipped at 0) to its references.
Captions longer than the text context are cut by the tokenizer, which keeps the end-of-text
token last (open_clip's `SimpleTokenizer`), so the pooled state is the right one.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from PIL import Image

from ml.clip import Preprocess, Tokenizer, encode_images, encode_texts
from ml.files import write_atomic, write_csv

VARIANTS = ("paper", "hessel")
HESSEL_PREFIX = "A photo depicts "
HESSEL_WEIGHT = 2.5


@dataclass
class ClipScore:
    """A variant's mean score and the per-pair scores it is the mean of."""

    variant: str
    score: float
    per_pair: list[float]
    cosines: list[float]
    ref_score: float | None = None  # RefCLIP-S (hessel, with references)
    ref_per_pair: list[float] = field(default_factory=list)


def scaled(cosines: torch.Tensor, variant: str) -> torch.Tensor:
    """Per-pair scores of `variant` from raw image-caption cosines."""
    if variant == "paper":
        return 100 * cosines
    if variant == "hessel":
        return HESSEL_WEIGHT * cosines.clamp(min=0)
    raise ValueError(f"CLIP-S variant must be one of {VARIANTS}, got {variant!r}")


def harmonic_ref(clip_s: torch.Tensor, ref_cosines: torch.Tensor) -> torch.Tensor:
    """RefCLIP-S per pair: harmonic mean of CLIP-S and the best reference cosine (>= 0)."""
    ref = ref_cosines.clamp(min=0)
    total = clip_s + ref
    return torch.where(total > 0, 2 * clip_s * ref / total.clamp(min=1e-12), 0.0)


def clip_score(
    model: open_clip.CLIP,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    variant: str = "paper",
    references: Sequence[Sequence[str]] | None = None,
    batch_size: int = 256,
) -> ClipScore:
    """CLIP-S of each (image, caption) pair in `variant`, and RefCLIP-S with `references`
    (hessel only: the paper's variant defines none)."""
    scaled(torch.zeros(1), variant)  # a bad variant fails before any work
    if len(images) != len(captions) or not captions:
        raise ValueError(f"need one caption per image (>0): {len(images)} vs {len(captions)}")
    if references is not None and variant != "hessel":
        raise ValueError("RefCLIP-S is defined for the 'hessel' variant only")
    prefix = HESSEL_PREFIX if variant == "hessel" else ""
    image_emb = encode_images(model, preprocess, images, batch_size)
    text_emb = _encode_once(model, tokenizer, [prefix + c for c in captions], batch_size)
    cosines = (image_emb * text_emb).sum(dim=1)
    per_pair = scaled(cosines, variant)
    result = ClipScore(variant, per_pair.mean().item(), per_pair.tolist(), cosines.tolist())
    if references is not None:
        if len(references) != len(captions) or not all(references):
            raise ValueError("need at least one reference caption per pair")
        flat = [prefix + r for refs in references for r in refs]
        ref_emb = _encode_once(model, tokenizer, flat, batch_size)
        owner = torch.repeat_interleave(torch.arange(len(references)), torch.tensor(
            [len(refs) for refs in references]
        ))
        ref_cos = (ref_emb * text_emb[owner]).sum(dim=1)
        best = torch.full((len(captions),), -1.0).scatter_reduce(0, owner, ref_cos, "amax")
        ref_per_pair = harmonic_ref(per_pair, best)
        result.ref_score = ref_per_pair.mean().item()
        result.ref_per_pair = ref_per_pair.tolist()
    return result


def _encode_once(
    model: open_clip.CLIP, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int
) -> torch.Tensor:
    """Text embeddings with each distinct text encoded once (GenEval-style sets repeat every
    prompt for several images)."""
    distinct = list(dict.fromkeys(texts))
    index = {text: i for i, text in enumerate(distinct)}
    embeddings = encode_texts(model, tokenizer, distinct, batch_size)
    return embeddings[torch.tensor([index[t] for t in texts])]


# --- scoring a folder of images against a JSONL file of captions (`dalle3 clip-score`) --------


def read_pairs(
    images_dir: Path, captions_file: Path
) -> tuple[list[str], list[Image.Image], list[str]]:
    """(file names, images, captions) of a JSONL file of {"image": name in images_dir,
    "caption": text} lines; every problem is an error naming its file and line."""
    if not captions_file.is_file():
        raise FileNotFoundError(f"captions file not found: {captions_file}")
    names, images, captions = [], [], []
    for number, line in enumerate(captions_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{captions_file}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not a JSON object: {err.msg}") from err
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise ValueError(f'{where}: needs "image" (a file name) and "caption" (a string)')
        if not isinstance(row.get("caption"), str):
            raise ValueError(f'{where}: "caption" must be a string')
        path = images_dir / row["image"]
        if not path.resolve().is_relative_to(images_dir.resolve()):
            raise ValueError(f'{where}: "image" must name a file inside {images_dir}')
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image not found: {path}")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"{where}: cannot read image {path}: {err}") from err
        names.append(row["image"])
        captions.append(row["caption"])
    if not captions:
        raise ValueError(f"captions file has no pairs: {captions_file}")
    return names, images, captions


def write_per_pair(
    path: Path, names: Sequence[str], captions: Sequence[str], score: ClipScore
) -> None:
    """Per-pair scores as JSONL, or CSV when `path` ends in .csv; written atomically."""
    rows = [
        {"image": name, "caption": caption, "cosine": cos, score.variant: value}
        for name, caption, cos, value in zip(
            names, captions, score.cosines, score.per_pair, strict=True
        )
    ]
    if path.suffix == ".csv":
        write_csv(path, rows, list(rows[0]))
    else:
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode())
