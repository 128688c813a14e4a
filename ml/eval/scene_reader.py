"""Read a ShapeWorld scene graph back from an image: background, objects and word.

Analysis by synthesis, so it is exact on the world's own renders and needs no training.
ShapeWorld blends flat palette colours into a flat background by pixel coverage (4x
supersampling, then box downsampling), so a pixel's distance from the background is its
coverage times a constant. Each grid cell is matched, by the cosine between that distance map
and a mask, against the renderer's own coverage masks of every shape and size in that cell,
shifted a few pixels for generated images; each place the world writes a word is matched the
same way against every word. An object's colour is the palette colour nearest the
least-squares unmixing of its pixels with its mask.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from ml.data.shapeworld import (
    BACKGROUNDS,
    COLORS,
    MIN_CONTRAST,
    POSITIONS,
    SHAPES,
    SIZES,
    WORDS,
    Scene,
    SceneObject,
    render,
)

_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
_BACKGROUNDS = np.array(list(BACKGROUNDS.values()), dtype=np.float64)
WHITE_INK = (255, 255, 255)  # words on dark backgrounds (black on light ones)
INK = MIN_CONTRAST / 2  # a cell with no pixel this far from the background is empty
MATCH = 0.6  # a cell's ink matching no mask this well is no object (on renders: 1 or < 0.35)
# Where the world writes a word (`shapeworld._draw_word`): across the bottom row if it is free,
# else across the top row, else in the first free cell; each with cells taken that force it.
WORD_PLACES: dict[str, tuple[tuple[str, ...], set[str]]] = {
    "bottom row": (POSITIONS[6:], set()),
    "top row": (POSITIONS[:3], {"bottom left"}),
    **{cell: ((cell,), set(POSITIONS) - {cell}) for cell in POSITIONS},
}


@dataclass(frozen=True)
class Reading:
    """A scene graph read from an image, with how well each part matched its mask (1: exact)."""

    background: str
    objects: tuple[SceneObject, ...]
    word: str | None
    object_match: tuple[float, ...]
    word_match: float = 0.0


def cells(size: int) -> np.ndarray:
    """The grid cell (index into POSITIONS) of each pixel, by the pixel's centre."""
    index = ((np.arange(size) + 0.5) * 3 // size).astype(np.int64)
    return index[:, None] * 3 + index[None, :]


def _to_coverage(image: Image.Image, ink: tuple[int, int, int]) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    black = np.array(BACKGROUNDS["black"], dtype=np.float64)
    return np.linalg.norm(pixels - black, axis=-1) / np.linalg.norm(np.array(ink) - black)


def shifts(size: int) -> list[tuple[int, int]]:
    """Mask offsets tried: none on a render, up to size/16 pixels either way for a drawing."""
    k = max(1, size // 16)
    return [(dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1)]


def _shifted(mask: np.ndarray, size: int) -> np.ndarray:
    """(len(shifts), size, size) copies of `mask` moved by each offset, zero filled."""
    out = np.zeros((len(shifts(size)), size, size))
    for i, (dy, dx) in enumerate(shifts(size)):
        src = mask[max(0, -dy) : size - max(0, dy), max(0, -dx) : size - max(0, dx)]
        out[i, max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


@lru_cache(maxsize=8)
def object_masks(size: int) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Every (shape, size) and its coverage masks: (9 cells, 12 kinds, shifts, size, size)."""
    kinds = [(shape, obj_size) for shape in SHAPES for obj_size in SIZES]
    masks = np.stack([
        np.stack([
            _shifted(_to_coverage(render(Scene("black", "plain", (
                SceneObject(shape, "white", obj_size, position),)), size), COLORS["white"]), size)
            for shape, obj_size in kinds
        ])
        for position in POSITIONS
    ])  # fmt: skip
    return kinds, masks


@lru_cache(maxsize=8)
def word_masks(size: int) -> np.ndarray:
    """Coverage masks of every word at every place: (places, words, shifts, size, size). The
    cells that force a place hold objects drawn in the background's own colour, and the render
    without the word is subtracted, which leaves the word's coverage alone."""
    places = []
    for _, used in WORD_PLACES.values():
        taken = tuple(SceneObject("circle", "black", "small", cell) for cell in used)
        blank = _to_coverage(render(Scene("black", "plain", taken), size), WHITE_INK)
        places.append(np.stack([
            _shifted(_to_coverage(render(Scene("black", "plain", taken, word), size), WHITE_INK)
                     - blank, size)
            for word in WORDS
        ]))  # fmt: skip
    return np.stack(places)


def _cosine(ink: np.ndarray, masks: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Cosine between the ink and each mask over the region's pixels (masks: (..., S, S))."""
    x = ink[region]
    m = masks[..., region]
    return (m @ x) / (np.linalg.norm(m, axis=-1) * np.linalg.norm(x) + 1e-12)


def read_scene(image: Image.Image) -> Reading:
    """The scene graph that best explains `image`; exact on ShapeWorld's plain renders."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    size = pixels.shape[0]
    if pixels.shape[:2] != (size, size):
        raise ValueError(f"the reader takes square images, got {image.size}")
    background = np.median(pixels.reshape(-1, 3), axis=0)  # objects cover well under half
    bg_name = list(BACKGROUNDS)[int(np.argmin(np.linalg.norm(_BACKGROUNDS - background, axis=1)))]
    ink = np.linalg.norm(pixels - background, axis=-1)
    grid = cells(size)
    kinds, masks = object_masks(size)

    inked, found = set(), {}
    for c, position in enumerate(POSITIONS):
        region = grid == c
        if ink[region].max() < INK:
            continue
        inked.add(position)
        score = _cosine(ink, masks[c], region)  # (kinds, shifts)
        k, s = np.unravel_index(int(np.argmax(score)), score.shape)
        if score[k, s] >= MATCH:  # not the edge of a neighbour, nor part of a word
            found[position] = (float(score[k, s]), *kinds[k], masks[c, k, s])

    word, word_score, word_cells = None, MATCH, set()
    words = word_masks(size)
    for p, (region_cells, _) in enumerate(WORD_PLACES.values()):
        if inked.isdisjoint(region_cells):
            continue
        region = np.isin(grid, [POSITIONS.index(cell) for cell in region_cells])
        score = _cosine(ink, words[p], region)  # (words, shifts)
        w, s = np.unravel_index(int(np.argmax(score)), score.shape)
        mask = words[p, w, s][region]
        strength = float(mask @ ink[region]) / max(float(mask @ mask), 1e-12)
        # a word must explain its cells better than any object found there, in full ink
        rivals = [found[cell][0] for cell in region_cells if cell in found]
        if score[w, s] > max([word_score, *rivals]) and strength >= MIN_CONTRAST:
            word, word_score, word_cells = WORDS[int(w)], float(score[w, s]), set(region_cells)
    found = {cell: v for cell, v in found.items() if cell not in word_cells}

    objects, matches = [], []
    for position in POSITIONS:  # reading order, as scene graphs list them
        if position not in found:
            continue
        score, shape, obj_size, mask = found[position]
        region = grid == POSITIONS.index(position)
        weights = mask[region]
        offset = weights @ (pixels[region] - background) / max(float(weights @ weights), 1e-12)
        if np.linalg.norm(offset) < INK:  # as faint as a texture: no object the world draws
            continue
        colour = background + offset
        name = list(COLORS)[int(np.argmin(np.linalg.norm(_PALETTE - colour, axis=1)))]
        objects.append(SceneObject(shape, name, obj_size, position))
        matches.append(score)
    return Reading(bg_name, tuple(objects), word, tuple(matches), word_score if word else 0.0)
