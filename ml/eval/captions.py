"""Scores of generated captions against ShapeWorld's scene graphs."""

from collections.abc import Sequence

from ml.data.sample import Sample
from ml.data.shapeworld import Scene, parse_caption, scene_of, score_caption


def evaluate_dsc(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """Attribute recall and precision, pooled over the dataset (micro-averaged).

    Pooling the counts weighs every attribute equally, so busy scenes count for more than
    one-object scenes, as they should for a captioner meant to describe everything.
    """
    counts = [
        score_caption(caption, scene) for caption, scene in zip(captions, scenes, strict=True)
    ]
    correct = sum(c["correct"] for c in counts)
    stated = sum(c["stated"] for c in counts)
    total = sum(c["total"] for c in counts)
    return {"recall": correct / total, "precision": correct / stated if stated else 0.0}


def main_object_correct(caption: str, scene: Scene) -> bool:
    """Whether the caption names the main object's colour and shape, and no other object."""
    named = {(f[1], f[2]) for f in parse_caption(caption) if f[0] == "object"}
    main = scene.objects[0]
    return named == {(main.color, main.shape)}


def evaluate_ssc(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """The fraction of short captions that get the main subject right."""
    hits = [main_object_correct(c, s) for c, s in zip(captions, scenes, strict=True)]
    return {"main_object_accuracy": sum(hits) / len(hits)}


def evaluate_captions(captions: Sequence[str], samples: Sequence[Sample]) -> dict[str, float]:
    """Captions against ShapeWorld's scene graphs: DSC attribute recall/precision and SSC
    main-object accuracy (each stage is scored on both, so the fine-tunes' effect shows).

    Data without scene graphs (a webdataset source) has no ground truth to score against:
    only the caption length is reported.
    """
    metrics = {"mean_words": sum(len(c.split()) for c in captions) / max(1, len(captions))}
    scenes = [scene_of(s) for s in samples]
    if None in scenes:
        return metrics
    dsc = evaluate_dsc(captions, scenes)
    return {
        "attribute_recall": dsc["recall"],
        "attribute_precision": dsc["precision"],
        **evaluate_ssc(captions, scenes),
        **metrics,
    }
