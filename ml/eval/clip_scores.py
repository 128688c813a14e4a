"""How well a CLIP ties images to text on held-out samples: retrieval recall against chance,
and whether it prefers a scene's true caption over one with an attribute changed."""

import random
from collections.abc import Sequence

import open_clip

from ml.clip import (
    Preprocess,
    Tokenizer,
    change_one,
    encode_images,
    encode_texts,
    reference_caption,
)
from ml.data.sample import Sample
from ml.data.shapeworld import Scene, descriptive_caption


def retrieval_recall(
    model: open_clip.CLIP,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    samples: Sequence[Sample],
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Image-to-text recall@k among the samples' reference captions, with chance = k/N."""
    images = encode_images(model, preprocess, [s.image for s in samples])
    texts = encode_texts(model, tokenizer, [reference_caption(s) for s in samples])
    similarity = images @ texts.T
    # Rank of the true caption: how many other captions score at least as high. Counting ties
    # against the model keeps a collapsed one (all embeddings equal) at zero recall.
    rank = (similarity >= similarity.diagonal()[:, None]).sum(dim=1) - 1
    n = len(samples)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"recall@{k}"] = (rank < k).float().mean().item()
        metrics[f"chance@{k}"] = min(k, n) / n
    return metrics


def pairwise_preference(
    model: open_clip.CLIP,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    samples: Sequence[Sample],
    attribute: str = "color",
    seed: int = 0,
) -> float:
    """Fraction of images that score their true descriptive caption above the caption of the
    same scene with one object's `attribute` ('color' or 'shape') changed.

    Both captions are written with the same seeded template and object order, so they differ
    in that one word only and sentence form cannot decide the comparison.
    """
    true_captions, false_captions = [], []
    for s in samples:
        scene = Scene.from_dict(s.meta["scene"])
        rng = random.Random(f"{seed}/{s.key}")
        false_scene = change_one(scene, rng, attribute)
        caption_seed = rng.random()
        true_captions.append(descriptive_caption(scene, random.Random(caption_seed)))
        false_captions.append(descriptive_caption(false_scene, random.Random(caption_seed)))
    images = encode_images(model, preprocess, [s.image for s in samples])
    true_score = (images * encode_texts(model, tokenizer, true_captions)).sum(dim=1)
    false_score = (images * encode_texts(model, tokenizer, false_captions)).sum(dim=1)
    return (true_score > false_score).float().mean().item()
