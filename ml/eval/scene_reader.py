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

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from ml.data.shapeworld import (
    BACKGROUNDS,
    COLORS,
    MIN_CONTRAST,
    POSITIONS,
    SHAPES,
    SIZES,
    WORDS,
    Placement,
    Scene,
    SceneObject,
    render,
)

_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
_BACKGROUNDS = np.array(list(BACKGROUNDS.values()), dtype=np.float64)
WHITE_INK = (255, 255, 255)  # words on dark backgrounds (black on light ones)
INK = MIN_CONTRAST / 2  # a cell with no pixel this far from the background is empty
SHIFT = 3 / 32  # how far off its cell's centre a drawn object may sit, as a share of the image
WORD_SHIFT = 1 / 16  # and a word off its place (more lets glyphs match the edges of objects)
SCALES = (0.85, 0.925, 1.0, 1.075, 1.15)  # how much larger or smaller than the template
BLURS = (0.0, 1.0)  # Gaussian blur radii of the masks, in pixels at 32 px
REACH = 0.05  # a mask reaches the pixels it covers at least this much
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


def shifts(size: int, share: float = SHIFT) -> list[tuple[int, int]]:
    """Mask offsets tried: up to `share` of the image either way, at least a pixel."""
    k = max(1, round(size * share))
    return [(dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1)]


def _shifted(mask: np.ndarray, size: int) -> np.ndarray:
    """(shifts, size, size) copies of a word's `mask` moved by each offset, zero filled."""
    offsets = shifts(size, WORD_SHIFT)
    out = np.zeros((len(offsets), size, size), dtype=np.float32)
    for i, (dy, dx) in enumerate(offsets):
        src = mask[max(0, -dy) : size - max(0, dy), max(0, -dx) : size - max(0, dx)]
        out[i, max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


@dataclass(frozen=True)
class CellMasks:
    """One cell's object masks, cut to the window of pixels any of them covers."""

    window: tuple[slice, slice]
    masks: np.ndarray  # (kinds, shifts, pixels of the window)
    norms: np.ndarray  # (kinds, shifts): each mask's length
    squares: np.ndarray  # (kinds, shifts): each mask's squared length
    inside: np.ndarray  # (pixels of the window,): those in the cell
    beyond: np.ndarray  # (kinds, shifts, pixels): where each mask reaches outside the cell

    def full(self, k: int, s: int, size: int) -> np.ndarray:
        """Mask (k, s) on the whole image."""
        out = np.zeros((size, size), dtype=np.float32)
        rows, cols = self.window
        out[rows, cols] = self.masks[k, s].reshape(rows.stop - rows.start, -1)
        return out


def _cell_masks(position: str, size: int, variants: list[tuple]) -> CellMasks:
    masks = np.stack([
        np.stack([
            _to_coverage(render(Scene("black", "plain", (
                SceneObject(shape, "white", obj_size, position),)), size,
                (Placement(dx, dy, scale),)).filter(ImageFilter.GaussianBlur(blur * size / 32)),
                COLORS["white"])
            for dy, dx in shifts(size)
        ])
        for shape, obj_size, scale, blur in variants
    ]).astype(np.float32)  # fmt: skip
    rows, cols = np.nonzero((masks > 0).any(axis=(0, 1)))
    window = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    masks = masks[:, :, window[0], window[1]].reshape(*masks.shape[:2], -1)
    inside = (cells(size)[window] == POSITIONS.index(position)).ravel()
    squares = (masks * masks).sum(-1)
    beyond = ((masks > REACH) & ~inside).astype(np.float32)
    return CellMasks(window, masks, np.sqrt(squares), squares, inside, beyond)


@lru_cache(maxsize=8)
def object_masks(size: int) -> tuple[list[tuple[str, str]], list[CellMasks]]:
    """Every (shape, size) drawn at each scale in SCALES and blur in BLURS, and each cell's
    coverage masks of them at every offset in `shifts` (kinds x scales x blurs, shifts)."""
    variants = list(itertools.product(SHAPES, SIZES, SCALES, BLURS))
    kinds = [(shape, obj_size) for shape, obj_size, *_ in variants]
    return kinds, [_cell_masks(position, size, variants) for position in POSITIONS]


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


def _match(ink: np.ndarray, cell: CellMasks) -> tuple[np.ndarray, np.ndarray]:
    """Cosine between the ink and each of a cell's masks over the cell and the mask's own
    reach (a mask drawn off the cell is judged on all of itself, yet not on a neighbour's ink
    that it does not cover), and the least-squares ink of a pixel each mask covers in full.
    Both (kinds, shifts)."""
    x = ink[cell.window].ravel().astype(np.float32)
    dot = cell.masks @ x
    norm = float(x[cell.inside] @ x[cell.inside]) + cell.beyond @ (x * x)
    return dot / (cell.norms * np.sqrt(norm) + 1e-12), dot / np.maximum(cell.squares, 1e-12)


def _grow(region: np.ndarray) -> np.ndarray:
    """The region and every pixel next to it (8-neighbourhood)."""
    padded = np.pad(region, 1)
    size = region.shape[0]
    return np.any([padded[dy : dy + size, dx : dx + size] for dy in range(3) for dx in range(3)], 0)


def _fit_objects(
    ink: np.ndarray, grid: np.ndarray
) -> dict[str, tuple[float, str, str, np.ndarray]]:
    """Each cell's best-matching object mask, best match first, the pixels each found object
    covers (and those next to them) cleared before the next is looked for: an object drawn
    across its cell's edge is not read again in its neighbour. Position -> (match, shape, size,
    mask)."""
    size = ink.shape[0]
    kinds, cell_masks = object_masks(size)
    residual = ink.copy()
    found: dict[str, tuple[float, str, str, np.ndarray]] = {}
    best: dict[int, tuple[float, int, int]] = {}  # cell -> (match, kind, shift), while valid
    while True:
        for c in set(range(len(POSITIONS))) - best.keys() - {POSITIONS.index(p) for p in found}:
            if residual[grid == c].max() < INK:
                best[c] = (0.0, 0, 0)
                continue
            score, strength = _match(residual, cell_masks[c])
            # as faint as a texture or the remnant of a neighbour taken away: no object
            score[strength < INK] = 0.0
            k, s = np.unravel_index(int(np.argmax(score)), score.shape)
            best[c] = (float(score[k, s]), int(k), int(s))
        c = max(best, key=lambda cell: best[cell][0], default=None)
        if c is None or best[c][0] < MATCH:  # not the edge of a neighbour, nor part of a word
            return found
        match, k, s = best.pop(c)
        mask = cell_masks[c].full(k, s, size)
        found[POSITIONS[c]] = (match, *kinds[k], mask)
        covered = _grow(mask > REACH)
        residual = np.where(covered, 0.0, residual)
        touched = {int(cell) for cell in np.unique(grid[covered])}
        best = {cell: v for cell, v in best.items() if cell not in touched}


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
    inked = {p for c, p in enumerate(POSITIONS) if ink[grid == c].max() >= INK}
    found = _fit_objects(ink, grid)

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
