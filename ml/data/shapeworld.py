"""ShapeWorld: a seeded procedural generator of image-text pairs with known ground truth.

Model hubs and web datasets are unreachable, so this stands in for web data (DESIGN.md section 4).
Every scene is a small scene graph (background, texture, 1-4 objects on a 3x3 grid, maybe a
word), so captions can be written from the truth and a captioner's output can be scored
against it. Everything is a pure function of its `random.Random`, so any slice of a dataset
can be regenerated on its own.
"""

import math
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ml.data.sample import Sample

RGB = tuple[int, int, int]

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 230),
    "yellow": (245, 215, 50),
    "purple": (150, 70, 200),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, RGB] = {
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "beige": (225, 210, 180),
    "navy": (25, 35, 85),
}
TEXTURES = ("plain", "stripes", "dots")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
WORDS = ("SALE", "CAT", "HI", "OK", "STOP", "SUN", "DOG", "YES", "NO", "BOX", "MAP", "ZOO")

# An object colour must be at least this far (RGB distance) from its background to stay visible.
MIN_CONTRAST = 90.0
SUPERSAMPLE = 4
SIZE_SCALE = {"small": 0.55, "large": 0.95}  # object extent as a fraction of a grid cell
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def visible_colors(background: str) -> tuple[str, ...]:
    """Object colours that stand out clearly against `background`."""
    bg = BACKGROUNDS[background]
    return tuple(c for c, rgb in COLORS.items() if math.dist(rgb, bg) >= MIN_CONTRAST)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A scene graph; objects[0] is the main subject: the first large object in reading order
    (rows top to bottom, each left to right), or the first object if none is large."""

    background: str
    texture: str
    objects: tuple[SceneObject, ...]
    word: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        objects = tuple(SceneObject(**o) for o in d["objects"])
        return cls(d["background"], d["texture"], objects, d.get("word"))


@dataclass
class AltTextNoise:
    """How often web-like alt-text is terse, wrong, irrelevant or empty; the rest is partial."""

    terse: float = 0.45
    wrong: float = 0.15
    irrelevant: float = 0.1
    empty: float = 0.05

    def __post_init__(self) -> None:
        for f in fields(self):
            p = getattr(self, f.name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"AltTextNoise.{f.name} must be in [0, 1], got {p}")
        total = sum(getattr(self, f.name) for f in fields(self))
        if total > 1.0 + 1e-9:
            names = ", ".join(f.name for f in fields(self))
            raise ValueError(f"AltTextNoise probabilities ({names}) sum to {total:.3f} > 1")


# The smallest render that still draws every cell of the 3x3 grid (the tests use 8).
MIN_IMAGE_SIZE = 8


@dataclass
class ShapeWorldConfig:
    """Generator knobs; `image_size` only affects rendering, so captions match at any size."""

    image_size: int = 32
    min_objects: int = 1
    max_objects: int = 4
    word_prob: float = 0.2
    texture_prob: float = 0.3
    noise: AltTextNoise = field(default_factory=AltTextNoise)

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}")
        # At most 8 objects so a word always has a free cell.
        if not 1 <= self.min_objects <= self.max_objects <= len(POSITIONS) - 1:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {len(POSITIONS) - 1}, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        for name in ("word_prob", "texture_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ShapeWorldConfig.{name} must be in [0, 1]")


def scene_of(sample: Sample) -> Scene | None:
    """A ShapeWorld sample's scene graph; None for data without one (a webdataset source)."""
    return Scene.from_dict(sample.meta["scene"]) if "scene" in sample.meta else None


# --- sampling ---------------------------------------------------------------------------------


def sample_scene(rng: random.Random, cfg: ShapeWorldConfig) -> Scene:
    background = rng.choice(list(BACKGROUNDS))
    texture = rng.choice(TEXTURES[1:]) if rng.random() < cfg.texture_prob else "plain"
    colors = visible_colors(background)
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    objects = [
        SceneObject(rng.choice(SHAPES), rng.choice(colors), rng.choice(SIZES), position)
        for position in rng.sample(POSITIONS, n)
    ]
    # The main subject must be visible in the image, or no captioner could name it: the largest
    # object, ties going to the first in reading order. The rest keep their random order.
    main = min(objects, key=lambda o: (o.size != "large", POSITIONS.index(o.position)))
    objects.remove(main)
    objects.insert(0, main)
    word = rng.choice(WORDS) if rng.random() < cfg.word_prob else None
    return Scene(background, texture, tuple(objects), word)


# --- rendering --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """How one object is drawn off its template: moved (dx, dy output pixels), scaled, and in
    another shade; what `ml.eval.perturb` varies to test a reader as a person reads."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    rgb: RGB | None = None


def render(
    scene: Scene,
    size: int,
    placements: tuple[Placement, ...] | None = None,
    background_rgb: RGB | None = None,
) -> Image.Image:
    """Draw at 4x and box-downsample, so small images stay clean and flat colours stay exact.
    `placements` (one per object) and `background_rgb` draw the scene off its templates."""
    big = size * SUPERSAMPLE
    bg = background_rgb or BACKGROUNDS[scene.background]
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    _draw_texture(draw, scene.texture, bg, big)
    cell = big / 3
    placements = placements or (Placement(),) * len(scene.objects)
    for obj, place in zip(scene.objects, placements, strict=True):
        cx, cy = _cell_centre(obj.position, cell)
        cx, cy = cx + place.dx * SUPERSAMPLE, cy + place.dy * SUPERSAMPLE
        radius = cell * SIZE_SCALE[obj.size] * place.scale / 2
        _draw_shape(draw, obj.shape, cx, cy, radius, place.rgb or COLORS[obj.color])
    if scene.word:
        _draw_word(draw, scene.word, {o.position for o in scene.objects}, bg, cell)
    return img.resize((size, size), Image.Resampling.BOX)


def _cell_centre(position: str, cell: float) -> tuple[float, float]:
    row, col = divmod(POSITIONS.index(position), 3)
    return (col + 0.5) * cell, (row + 0.5) * cell


def _shade(rgb: RGB, amount: int) -> RGB:
    """A slightly lighter (on dark) or darker (on light) variant, for faint textures."""
    sign = 1 if sum(rgb) < 3 * 128 else -1
    r, g, b = (min(255, max(0, c + sign * amount)) for c in rgb)
    return r, g, b


def _draw_texture(draw: ImageDraw.ImageDraw, texture: str, bg: RGB, big: int) -> None:
    """Faint stripes or dots, sized relative to the image so every resolution looks alike."""
    colour = _shade(bg, 22)
    step = big // 8
    if texture == "stripes":
        for offset in range(-big, big, step):
            draw.line([(offset, big), (offset + big, 0)], fill=colour, width=big // 32)
    elif texture == "dots":
        r = big / 40
        for y in range(step // 2, big, step):
            for x in range(step // 2, big, step):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: RGB
) -> None:
    """Draw `shape` inside the square of half-side `r` centred on (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        s = r * 0.85  # a full-box square would look much bigger than the other shapes
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "cross":
        t = r / 3
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_word(draw: ImageDraw.ImageDraw, word: str, used: set[str], bg: RGB, cell: float) -> None:
    """Write the word across an empty bottom or top row, else in the first empty cell."""
    rows = [(2, POSITIONS[6:]), (0, POSITIONS[:3])]
    free_row = next((r for r, cells in rows if used.isdisjoint(cells)), None)
    if free_row is not None:
        box = (0.0, free_row * cell, 3 * cell, (free_row + 1) * cell)
    else:
        row, col = divmod(POSITIONS.index(next(p for p in POSITIONS if p not in used)), 3)
        box = (col * cell, row * cell, (col + 1) * cell, (row + 1) * cell)
    width, height = box[2] - box[0], box[3] - box[1]
    font_size = max(4, int(height * 0.6))
    while font_size > 4 and _font(font_size).getlength(word) > width * 0.9:
        font_size -= 1
    colour = (0, 0, 0) if sum(bg) > 3 * 128 else (255, 255, 255)
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    draw.text(centre, word, fill=colour, font=_font(font_size), anchor="mm")


# --- captions ---------------------------------------------------------------------------------


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _position_phrase(position: str, rng: random.Random) -> str:
    if position == "center":
        return rng.choice(["in the center", "in the middle"])
    if " " in position:
        return rng.choice([f"in the {position}", f"in the {position} corner"])
    return f"at the {position}" if position in ("top", "bottom") else f"on the {position}"


def _object_phrase(obj: SceneObject, with_size: bool) -> str:
    words = [obj.size] if with_size else []
    return " ".join([*words, obj.color, obj.shape])


def short_caption(scene: Scene, rng: random.Random) -> str:
    """The main subject only, optionally with its size, in one of a few phrasings."""
    phrase = _object_phrase(scene.objects[0], with_size=rng.random() < 0.5)
    return rng.choice([_a(phrase), _sentence(_a(phrase)) + ".", phrase, _sentence(phrase)])


def _background_phrase(scene: Scene, rng: random.Random, adjective_only: bool) -> str:
    adjective = {"plain": "plain", "stripes": "striped", "dots": "dotted"}[scene.texture]
    suffix = {"stripes": "with faint stripes", "dots": "with a dot pattern"}.get(scene.texture)
    if suffix and not adjective_only and rng.random() < 0.5:
        return f"{scene.background} background {suffix}"
    return f"{adjective} {scene.background} background"


def _word_sentence(word: str, rng: random.Random) -> str:
    return rng.choice(
        [
            f' The word "{word}" is written on it.',
            f' It reads "{word}".',
            f' The text "{word}" appears in the image.',
        ]
    )


def descriptive_caption(scene: Scene, rng: random.Random) -> str:
    """Every fact of the scene, in one of a few templates and object orders.

    Positions always follow their object, so `parse_caption` can attach them unambiguously.
    """
    objects = list(scene.objects)
    if rng.random() < 0.5:
        rest = objects[1:]
        rng.shuffle(rest)
        objects = objects[:1] + rest
    listed = _join(
        [f"{_a(_object_phrase(o, True))} {_position_phrase(o.position, rng)}" for o in objects]
    )
    template = rng.randrange(3)
    if template == 0:
        text = f"{_sentence(listed)} on {_a(_background_phrase(scene, rng, False))}."
    elif template == 1:
        text = f"{_sentence(_a(_background_phrase(scene, rng, True)))} with {listed}."
    else:
        n = len(objects)
        count = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}"
        text = f"{_sentence(count)} on {_a(_background_phrase(scene, rng, False))}: {listed}."
    return text + (_word_sentence(scene.word, rng) if scene.word else "")


_JUNK = (
    "IMG_{n:04d}.jpg",
    "DSC_{n:04d}",
    "free shipping",
    "click to enlarge",
    "stock photo",
    "image {n}",
    "photo-{n}.png",
    "best price!! order now",
    "untitled-{n}",
    "thumbnail",
)


def alt_text(scene: Scene, rng: random.Random, noise: AltTextNoise) -> tuple[str, str]:
    """Web-like alt-text and its kind: terse, wrong, irrelevant, empty or partial."""
    kind = _noise_kind(rng.random(), noise)
    main = scene.objects[0]
    if kind == "terse":
        color_shape = f"{main.color} {main.shape}"
        forms = [color_shape, _a(main.shape), main.shape, _a(color_shape), f"{color_shape} icon"]
        return rng.choice(forms), kind
    if kind == "wrong":
        # Change the main object's colour or shape into one that no object in the scene has.
        present = {(o.color, o.shape) for o in scene.objects}
        candidates = [replace(main, color=c) for c in COLORS] + [
            replace(main, shape=s) for s in SHAPES
        ]
        wrong = rng.choice([o for o in candidates if (o.color, o.shape) not in present])
        return short_caption(replace(scene, objects=(wrong,)), rng), kind
    if kind == "irrelevant":
        return rng.choice(_JUNK).format(n=rng.randrange(10000)), kind
    if kind == "empty":
        return "", kind
    return _partial_caption(scene, rng), kind


def _noise_kind(r: float, noise: AltTextNoise) -> str:
    """The noise field whose slice of [0, 1) holds r, or "partial" past them all."""
    for f in fields(noise):
        p = getattr(noise, f.name)
        if r < p:
            return f.name
        r -= p
    return "partial"


def _partial_caption(scene: Scene, rng: random.Random) -> str:
    """A true but incomplete human-style caption: one or two objects, no positions."""
    objects = [scene.objects[0]]
    if len(scene.objects) > 1 and rng.random() < 0.7:
        objects.append(rng.choice(scene.objects[1:]))
    text = _join([_a(_object_phrase(o, with_size=rng.random() < 0.3)) for o in objects])
    if rng.random() < 0.3:
        text += f" on {_a(scene.background)} background"
    if scene.word and rng.random() < 0.5:
        text += f' with the text "{scene.word}"'
    return _sentence(text) if rng.random() < 0.5 else text


# --- facts, parsing and scoring ---------------------------------------------------------------

# A fact is ("object", color, shape, size, position) with None for what a caption leaves out,
# or ("background", name), ("texture", name), ("word", WORD). Object facts carry no index, so
# sets of facts compare without depending on the order in which a caption lists objects.
Fact = tuple[str | None, ...]
OBJECT_ATTRIBUTES = ("color", "shape", "size", "position")

_POSITION_ALIASES = {"middle": "center", "centre": "center"}
_TEXTURE_ALIASES = {
    "plain": "plain", "striped": "stripes", "stripes": "stripes",
    "dotted": "dots", "dots": "dots", "dot pattern": "dots",
}  # fmt: skip


def _alternation(words: Iterable[str]) -> str:
    """Longest first, so that "top left" wins over "top"."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_WORD_RE = re.compile(r"[\"“”]([A-Za-z]+)[\"“”]")
_BACKGROUND_RE = re.compile(rf"\b({_alternation(BACKGROUNDS)}) background\b")
_TEXTURE_RE = re.compile(rf"\b({_alternation(_TEXTURE_ALIASES)})\b")
_POSITION_WORDS = [p.replace(" ", "[ -]") for p in POSITIONS] + list(_POSITION_ALIASES)
_TOKEN_RE = re.compile(
    rf"\b(?:(?P<size>{_alternation(SIZES)})"
    rf"|(?P<color>{_alternation(COLORS)})"
    rf"|(?P<shape>{_alternation(SHAPES)})"
    rf"|(?P<position>{'|'.join(sorted(_POSITION_WORDS, key=len, reverse=True))}))\b"
)


def caption_facts(scene: Scene) -> set[Fact]:
    """The ground-truth facts of a scene, in the form `parse_caption` returns."""
    facts: set[Fact] = {("object", o.color, o.shape, o.size, o.position) for o in scene.objects}
    facts |= {("background", scene.background), ("texture", scene.texture)}
    if scene.word:
        facts.add(("word", scene.word))
    return facts


def parse_parts(text: str) -> tuple[list[dict[str, str | None]], set[Fact]]:
    """Objects (in caption order) and scene-level facts stated by a caption."""
    scene_facts: set[Fact] = {("word", w.upper()) for w in _WORD_RE.findall(text)}
    rest = _WORD_RE.sub(" ", text).lower()
    scene_facts |= {("background", b) for b in _BACKGROUND_RE.findall(rest)}
    # Background colour names (e.g. "white background") must not read as object colours.
    rest = _BACKGROUND_RE.sub(" background ", rest)
    scene_facts |= {("texture", _TEXTURE_ALIASES[t]) for t in _TEXTURE_RE.findall(rest)}
    objects: list[dict[str, str | None]] = []
    pending: dict[str, str | None] = {}
    for m in _TOKEN_RE.finditer(rest):
        kind, value = m.lastgroup, m.group()
        if kind in ("size", "color"):
            pending[kind] = value
        elif kind == "shape":
            objects.append(dict.fromkeys(OBJECT_ATTRIBUTES) | pending | {"shape": value})
            pending = {}
        elif objects and objects[-1]["position"] is None and not pending:
            value = value.replace("-", " ")
            objects[-1]["position"] = _POSITION_ALIASES.get(value, value)
    return objects, scene_facts


def parse_caption(text: str) -> set[Fact]:
    """The facts a caption states, found by matching the ShapeWorld vocabulary.

    An object is "<size>? <color>? <shape>" and takes the first position named after it and
    before the next object starts; backgrounds are "<colour> background"; words are quoted.
    """
    objects, facts = parse_parts(text)
    return facts | {("object", *(o[a] for a in OBJECT_ATTRIBUTES)) for o in objects}


def score_caption(text: str, scene: Scene) -> dict[str, float]:
    """Attribute recall and precision of a caption against the scene graph.

    Atoms are each object's colour, shape, size and position plus the background, texture and
    word. Each stated object is matched to at most one true object, preferring the same
    shape and colour, then the most agreeing attributes. Precision is 0 when nothing is stated;
    the raw counts are returned too, for micro-averaging over a dataset.
    """
    parsed, stated_scene = parse_parts(text)
    truth = [asdict(o) for o in scene.objects]
    pairs = sorted(
        ((_match_score(p, t), i, j) for i, p in enumerate(parsed) for j, t in enumerate(truth)),
        reverse=True,
    )
    used_parsed: set[int] = set()
    used_truth: set[int] = set()
    correct = 0
    for score, i, j in pairs:
        if i not in used_parsed and j not in used_truth and score > 0:
            used_parsed.add(i)
            used_truth.add(j)
            correct += sum(parsed[i][a] == truth[j][a] for a in OBJECT_ATTRIBUTES)
    true_scene = caption_facts(scene) - {f for f in caption_facts(scene) if f[0] == "object"}
    correct += len(stated_scene & true_scene)
    stated = sum(v is not None for o in parsed for v in o.values()) + len(stated_scene)
    total = len(OBJECT_ATTRIBUTES) * len(truth) + len(true_scene)
    return {
        "recall": correct / total,
        "precision": correct / stated if stated else 0.0,
        "correct": float(correct),
        "stated": float(stated),
        "total": float(total),
    }


def _match_score(parsed: dict[str, str | None], truth: dict[str, str]) -> int:
    agree = sum(parsed[a] == truth[a] for a in OBJECT_ATTRIBUTES)
    same_kind = parsed["shape"] == truth["shape"] and parsed["color"] == truth["color"]
    return agree + len(OBJECT_ATTRIBUTES) * same_kind


# --- datasets ---------------------------------------------------------------------------------


def generate(
    n: int, seed: int, cfg: ShapeWorldConfig, split: str, start: int = 0
) -> Iterator[Sample]:
    """Samples start..start+n-1 of a split; each is seeded on its own, so slices reproduce."""
    if "." in split:
        raise ValueError(f"split {split!r} must not contain '.' (webdataset keys split on it)")
    for index in range(start, start + n):
        rng = random.Random(f"{seed}/{split}/{index}")
        scene = sample_scene(rng, cfg)
        text, kind = alt_text(scene, rng, cfg.noise)
        meta = {
            "split": split,
            "index": index,
            "scene": scene.to_dict(),
            "alt_text_kind": kind,
            "short_caption": short_caption(scene, rng),
            "descriptive_caption": descriptive_caption(scene, rng),
        }
        yield Sample(f"{split}{index:08d}", render(scene, cfg.image_size), text, meta)


# GenEval's six categories (its tags), plus the words the world writes.
EVAL_CATEGORIES = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr", "text",
)  # fmt: skip


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def eval_prompts(seed: int, per_category: int = 8) -> list[dict[str, Any]]:
    """Held-out prompts grouped by GenEval's categories, each with a target scene and what the
    prompt asks for, which is all an image is held to.

    "asks" has "objects" (each a shape with, where the prompt states them, a colour, a position
    and an exact count; otherwise at least one), and a "background" or "word" if stated.
    """
    rng = random.Random(f"{seed}/eval")
    prompts: list[dict[str, Any]] = []

    def add(
        category: str,
        prompt: str,
        asks: dict[str, Any],
        background: str,
        *objects: SceneObject,
        word: str | None = None,
    ) -> None:
        scene = Scene(background, "plain", objects, word)
        prompts.append(
            {"category": category, "prompt": prompt, "asks": asks, "scene": scene.to_dict()}
        )

    def colour_and_shape(background: str) -> tuple[str, str]:
        return rng.choice(visible_colors(background)), rng.choice(SHAPES)

    for k in range(per_category):
        # Cycle through the attribute each category tests, so every value is covered.
        shape, bg = SHAPES[k % len(SHAPES)], list(BACKGROUNDS)[k % len(BACKGROUNDS)]
        obj = SceneObject(shape, rng.choice(visible_colors(bg)), "large", "center")
        asks = {"objects": [{"shape": shape}], "background": bg}
        add("single_object", f"{_a(shape)} on {_a(bg)} background", asks, bg, obj)

        bg, shapes = rng.choice(list(BACKGROUNDS)), rng.sample(SHAPES, 2)
        objs = [
            SceneObject(shape, rng.choice(visible_colors(bg)), "large", position)
            for shape, position in zip(shapes, ("left", "right"), strict=True)
        ]
        asks = {"objects": [{"shape": shape} for shape in shapes]}
        add("two_object", f"{_a(shapes[0])} and {_a(shapes[1])}", asks, bg, *objs)

        n, bg = 2 + k % 3, rng.choice(list(BACKGROUNDS))
        color, shape = colour_and_shape(bg)
        objs = [SceneObject(shape, color, "small", p) for p in rng.sample(POSITIONS, n)]
        asks = {"objects": [{"shape": shape, "color": color, "count": n}]}
        add("counting", f"{NUMBER_WORDS[n]} {color} {_plural(shape)}", asks, bg, *objs)

        color = list(COLORS)[k % len(COLORS)]
        bg = rng.choice([b for b in BACKGROUNDS if color in visible_colors(b)])
        shape = rng.choice(SHAPES)
        asks = {"objects": [{"shape": shape, "color": color}]}
        obj = SceneObject(shape, color, "large", "center")
        add("colors", _a(f"{color} {shape}"), asks, bg, obj)

        position, bg = POSITIONS[k % len(POSITIONS)], rng.choice(list(BACKGROUNDS))
        color, shape = colour_and_shape(bg)
        prompt = f"{_a(f'{color} {shape}')} {_position_phrase(position, rng)}"
        asks = {"objects": [{"shape": shape, "color": color, "position": position}]}
        add("position", prompt, asks, bg, SceneObject(shape, color, "large", position))

        bg = rng.choice(list(BACKGROUNDS))
        colors, shapes = rng.sample(visible_colors(bg), 2), rng.sample(SHAPES, 2)
        objs = [
            SceneObject(s, c, "large", p)
            for s, c, p in zip(shapes, colors, ("left", "right"), strict=True)
        ]
        prompt = " and ".join(_a(f"{c} {s}") for s, c in zip(shapes, colors, strict=True))
        asks = {"objects": [{"shape": s, "color": c} for s, c in zip(shapes, colors, strict=True)]}
        add("color_attr", prompt, asks, bg, *objs)

        word, bg = WORDS[k % len(WORDS)], rng.choice(list(BACKGROUNDS))
        color, shape = colour_and_shape(bg)
        obj = SceneObject(shape, color, "large", "center")
        asks = {"objects": [{"shape": shape, "color": color}], "word": word}
        prompt = f'{_a(f"{color} {shape}")} and the word "{word}"'
        add("text", prompt, asks, bg, obj, word=word)
    return sorted(prompts, key=lambda p: EVAL_CATEGORIES.index(p["category"]))


def user_prompt(scene: Scene, rng: random.Random) -> tuple[str, Scene]:
    """A short prompt about part of a scene, in one of the forms users write (and the held-out
    prompts take): an object with its position, on its background, two objects with or without
    their colours, a count, an object and the word; and the scene it describes. Scenes seldom
    hold one object twice or a word, so a count repeats the main object in other free cells and
    a scene without a word is given one."""
    main = scene.objects[0]
    forms = ["position", "background", "count", "word"] + ["two"] * (len(scene.objects) > 1)
    form = rng.choice(forms)
    coloured = _a(f"{main.color} {main.shape}")
    objects: tuple[SceneObject, ...] = (main,)
    word = None
    if form == "position":
        prompt = f"{coloured} {_position_phrase(main.position, rng)}"
    elif form == "background":
        prompt = f"{_a(main.shape)} on {_a(scene.background)} background"
    elif form == "two":
        objects = (main, rng.choice(scene.objects[1:]))
        with_colour = rng.random() < 0.5
        prompt = " and ".join(_a(f"{o.color} {o.shape}" if with_colour else o.shape)
                              for o in objects)  # fmt: skip
    elif form == "count":
        n = rng.randint(2, 4)
        cells = rng.sample([p for p in POSITIONS if p != main.position], n - 1)
        objects = (main, *(replace(main, position=p) for p in cells))
        prompt = f"{NUMBER_WORDS[n]} {main.color} {_plural(main.shape)}"
    else:
        word = scene.word or rng.choice(WORDS)
        prompt = f'{coloured} and the word "{word}"'
    return prompt, replace(scene, objects=objects, word=word)
