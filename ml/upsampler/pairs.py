"""The upsampler's training pairs: what users type -> the descriptive caption it should become.

From raw_pairs' labelled split, each short caption, each alt-text and a user-style prompt
(`written`) paired with a ground-truth descriptive caption; from recaptioned_dataset, each
alt-text paired with the DSC captioner's caption of the same image. Alt-text is often junk or
wrong, so a pair is kept only when its target bears out the source's words (`overlap`): an
upsampler trained on "a red circle" -> "a blue square ..." would learn to contradict its users.

Where a labelled sample has its scene graph (ShapeWorld), the target describes the scene with
only the objects (and word) the source mentions, in the descriptive captions' own templates:
the upsampler learns to settle sizes, positions and the background, not to add subjects, which
would break a prompt's count ("two red circles"). Elsewhere it is the whole caption.
"""

import random
import re
from dataclasses import replace
from pathlib import Path

from ml.data.raw_pairs import load_split
from ml.data.recaption import ALT_TEXT, read_sidecar
from ml.data.sample import Sample
from ml.data.shapeworld import (
    Scene,
    SceneObject,
    descriptive_caption,
    parse_parts,
    user_prompt,
)

WORD = re.compile(r"[a-z0-9]+")
STOP_WORDS = frozenset({"a", "an", "the", "on", "in", "at", "of", "with", "and"})
DSC = "dsc"  # the recaptioned_dataset column of descriptive synthetic captions


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower())) - STOP_WORDS


def overlap(source: str, target: str) -> float:
    """The share of the source's content words that the target also uses (0 for none)."""
    said = words(source)
    return len(said & words(target)) / len(said) if said else 0.0


def described(sample: Sample, source: str) -> str:
    """The descriptive caption of what `source` says of the sample's scene, or the sample's
    whole descriptive caption when it has no scene graph or the source names none of it."""
    if "scene" not in sample.meta:
        return sample.meta["descriptive_caption"]
    scene = Scene.from_dict(sample.meta["scene"])
    named, facts = parse_parts(source)
    objects: list[SceneObject] = []  # one scene object per mention, in the scene's order
    for mention in named:
        match = next(
            (
                o for o in scene.objects
                if o not in objects and o.shape == mention["shape"]
                and mention["color"] in (None, o.color) and mention["size"] in (None, o.size)
            ),
            None,
        )  # fmt: skip
        if match is not None:
            objects.append(match)
    objects.sort(key=scene.objects.index)
    if not objects:
        return sample.meta["descriptive_caption"]
    word = scene.word if ("word", scene.word) in facts else None
    rng = random.Random(f"upsampler/{sample.key}/{source}")
    return descriptive_caption(replace(scene, objects=tuple(objects), word=word), rng)


def written(sample: Sample) -> tuple[str, str]:
    """A user-style prompt about part of a labelled scene (`shapeworld.user_prompt`: positions,
    backgrounds, pairs, counts, words, which short captions and alt-text never state), and the
    descriptive caption of that part."""
    rng = random.Random(f"upsampler/{sample.key}/prompt")
    prompt, part = user_prompt(Scene.from_dict(sample.meta["scene"]), rng)
    return prompt, descriptive_caption(part, rng)


def training_pairs(
    raw: Path, recaptioned: Path | None, sources: tuple[str, ...], min_overlap: float
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(source, target) pairs, and how many each source offered and kept."""
    offered: dict[str, list[tuple[str, str]]] = {}
    if "labelled" in sources:
        samples = [s for s in load_split(raw, "labelled") if "descriptive_caption" in s.meta]
        offered["labelled_short"] = [
            (s.meta["short_caption"], described(s, s.meta["short_caption"]))
            for s in samples
            if "short_caption" in s.meta
        ]
        offered["labelled_alt"] = [(s.text, described(s, s.text)) for s in samples]
        offered["labelled_prompt"] = [written(s) for s in samples if "scene" in s.meta]
    if "recaptioned" in sources:
        if recaptioned is None:
            raise FileNotFoundError("pair source 'recaptioned' needs the recaptioned_dataset input")
        rows = [
            row for sidecar in sorted(recaptioned.glob("*.parquet"))
            for row in read_sidecar(sidecar).values()
        ]  # fmt: skip
        if rows and DSC not in rows[0]:
            raise ValueError(f"recaptioned_dataset has no '{DSC}' column: {sorted(rows[0])}")
        offered["recaptioned_alt"] = [(row[ALT_TEXT], row[DSC]) for row in rows]
    pairs: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    for name, candidates in offered.items():
        # short captions and written prompts are true of their scene; alt-text is not
        floor = min_overlap if name.endswith("_alt") else 0.0
        kept = [(s, t) for s, t in candidates if t.strip() and overlap(s, t) >= floor]
        counts |= {f"{name}_offered": len(candidates), f"{name}_kept": len(kept)}
        pairs += kept
    if not pairs:
        raise ValueError(f"no training pairs kept of {sorted(offered)} (min_overlap {min_overlap})")
    return pairs, counts
