"""How well an upsampler keeps what a prompt asks, read from its text alone.

An upsampled prompt is parsed with the world's caption parser (`shapeworld.parse_parts`) and
held to the prompt's "asks" by the oracle's own rule (`oracle.follows`), as if the text were
an image: every asked object with its stated colour, position and count, the background and
the word. So "keeps" means the image model is asked for everything the user asked, nothing
contradicting it; what the upsampler settled on its own is listed as `added_details`.
"""

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ml.data.shapeworld import SceneObject, parse_parts
from ml.eval.oracle import category_scores, follows
from ml.eval.scene_reader import Reading


def text_reading(text: str) -> Reading:
    """A caption read as a scene: its stated objects (unstated attributes None), background
    and word."""
    objects, facts = parse_parts(text)
    background = next((f[1] for f in facts if f[0] == "background"), None)
    word = next((f[1] for f in facts if f[0] == "word"), None)
    found = tuple(SceneObject(o["shape"], o["color"], o["size"], o["position"]) for o in objects)
    return Reading(background, found, word, object_match=(1.0,) * len(found))


def keeps(text: str, asks: dict[str, Any]) -> bool:
    return follows(text_reading(text), asks)


def added_details(prompt: str, text: str) -> list[str]:
    """What the upsampled text states that the prompt did not: a background, the size or
    position of an asked object, or an object nobody asked for."""
    asked, said = text_reading(prompt), text_reading(text)
    added = [f"background: {said.background}"] if said.background and not asked.background else []
    unmatched = list(asked.objects)
    for obj in said.objects:
        match = next(
            (a for a in unmatched if a.shape == obj.shape and a.color in (None, obj.color)), None
        )
        if match is None:
            added.append("object: " + " ".join(v for v in (obj.size, obj.color, obj.shape) if v))
            continue
        unmatched.remove(match)
        for name in ("color", "size", "position"):
            if getattr(obj, name) and not getattr(match, name):
                added.append(f"{obj.shape} {name}: {getattr(obj, name)}")
    return added


def score_upsampling(
    prompts: Sequence[dict[str, Any]], upsampled: Sequence[str]
) -> dict[str, float]:
    """Per category of the held-out prompts: the share whose upsampled text keeps all they ask,
    with its Wilson interval and count (`kept_<category>_accuracy`, `_low`, `_high`, `_n`,
    as `oracle.category_scores` gives them); their mean
    (`kept_overall_accuracy`); and the upsampled prompts' mean length in words."""
    if len(prompts) != len(upsampled) or not prompts:
        raise ValueError(
            f"need one upsampled text per prompt (>0): {len(prompts)} vs {len(upsampled)}"
        )
    verdicts: dict[str, list[bool]] = defaultdict(list)
    for prompt, text in zip(prompts, upsampled, strict=True):
        verdicts[prompt["category"]].append(keeps(text, prompt["asks"]))
    scores = {f"kept_{name}": value for name, value in category_scores(verdicts).items()}
    scores["words_mean"] = sum(len(t.split()) for t in upsampled) / len(upsampled)
    return scores
