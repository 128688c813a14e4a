"""Text encoders for the diffusion model, side by side: what their states say about the scene.

    python bench/bench_text_encoder.py --out DIR [--steps 3000] [--samples 8192] [--joint DIR]

Pretrains the toy T5 (unless DIR holds one) on the world's text
(`ml.diffusion.text_pretraining`: alt-texts, short and descriptive captions of `--samples`
train-split scenes; never the eval split) and saves its encoder and tokenizer to DIR in T5's
layout (what `--text-encoder` of `bench_latent.py t2i` and `text_encoder_path` load). Then
probes each encoder's masked-mean states with a logistic regression fitted on train-split
captions and scored on eval-split ones: a one-object caption's colour, shape and cell; a
two-object caption's binding (`two_objects`), beside the same regression on word counts (what
needs no encoder). Encoders: the same T5 at its random initialisation; the pretrained one;
with `--joint`, the text encoder of a trained pipeline folder (trained with the U-Net, today's
recipe). One JSON line each.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from transformers import AutoTokenizer, T5EncoderModel

from ml.data.shapeworld import Scene, ShapeWorldConfig, generate
from ml.diffusion.pipeline import encode_prompts
from ml.diffusion.text_pretraining import (
    TextPretrainConfig,
    build_tokenizer,
    pretrain_text_encoder,
    save_text_encoder,
    world_text,
)
from ml.speed_probe import describe, probe
from ml.stage import ConsoleLog

ASKED = ("color", "shape", "position")


def two_objects(split: str, n: int) -> tuple[list[str], dict[str, list[str]]]:
    """Descriptive captions of two-object scenes whose objects differ in shape and colour,
    answered by the colour of the object whose shape sorts first: a bag of words holds both
    colours and both shapes but not which goes with which (binding)."""
    captions, answers = [], {"binding": []}
    for sample in generate(12 * n, 0, ShapeWorldConfig(), split):
        objects = Scene.from_dict(sample.meta["scene"]).objects
        if len(objects) != 2 or len(captions) == n:
            continue
        a, b = sorted(objects, key=lambda o: o.shape)
        if a.shape != b.shape and a.color != b.color:
            captions.append(sample.meta["descriptive_caption"])
            answers["binding"].append(a.color)
    return captions, answers


def bag_of_words(train, test) -> dict[str, float]:
    """The same logistic regression on word counts: what a probe reads without any encoder."""
    words = CountVectorizer().fit(train[0])
    x_train, x_test = words.transform(train[0]), words.transform(test[0])
    return {
        what: round(float(LogisticRegression(max_iter=2000).fit(x_train, labels)
                          .score(x_test, test[1][what])), 3)
        for what, labels in train[1].items()
    }  # fmt: skip


def one_object(split: str, n: int) -> tuple[list[str], dict[str, list[str]]]:
    """Descriptive captions of the first `n` one-object scenes of a split, and their answers."""
    captions, answers = [], {what: [] for what in ASKED}
    for sample in generate(6 * n, 0, ShapeWorldConfig(), split):
        scene = Scene.from_dict(sample.meta["scene"])
        if len(scene.objects) == 1 and len(captions) < n:
            captions.append(sample.meta["descriptive_caption"])
            for what in ASKED:
                answers[what].append(getattr(scene.objects[0], what))
    return captions, answers


@torch.no_grad()
def pooled(encoder: T5EncoderModel, tokenizer, captions: list[str]) -> torch.Tensor:
    rows = []
    for start in range(0, len(captions), 256):
        states, mask = encode_prompts(tokenizer, encoder, captions[start : start + 256])
        weights = mask.unsqueeze(-1).float()
        rows.append((states * weights).sum(1) / weights.sum(1))
    return torch.cat(rows)


def probe_scores(encoder: T5EncoderModel, tokenizer, train, test) -> dict[str, float]:
    encoder.eval()
    x_train, x_test = pooled(encoder, tokenizer, train[0]), pooled(encoder, tokenizer, test[0])
    scores = {}
    for what in train[1]:
        fit = LogisticRegression(max_iter=2000).fit(x_train.numpy(), train[1][what])
        scores[what] = round(float(fit.score(x_test.numpy(), test[1][what])), 3)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=8192, help="train-split scenes' text")
    parser.add_argument("--joint", type=Path, help="a trained pipeline folder to probe too")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(describe(probe()))
    cfg = TextPretrainConfig()
    cfg.train.steps = args.steps
    texts = world_text(list(generate(args.samples, 0, ShapeWorldConfig(), "train")))
    if not (args.out / "config.json").is_file():
        start = time.time()
        log = ConsoleLog(args.out / "log")
        encoder, tokenizer, result = pretrain_text_encoder(texts, cfg, log)
        save_text_encoder(encoder, tokenizer, args.out)
        print(json.dumps({
            "pretrained": str(args.out), "texts": len(texts), "steps": result.steps,
            "wall_s": round(time.time() - start), "final_loss": round(result.final_loss, 3),
        }))  # fmt: skip

    probes = {
        "one object": (one_object("train", 2048), one_object("eval", 512)),
        "two objects": (two_objects("train", 2048), two_objects("eval", 512)),
    }
    for name, (train, test) in probes.items():
        print(
            json.dumps(
                {"encoder": "none (bag of words)", "probe": name, **bag_of_words(train, test)}
            )
        )
    torch.manual_seed(0)
    random_init = T5EncoderModel(T5EncoderModel.from_pretrained(args.out).config)
    encoders = {"random init": (random_init, build_tokenizer(texts, cfg))}
    encoders["pretrained"] = (
        T5EncoderModel.from_pretrained(args.out),
        AutoTokenizer.from_pretrained(args.out),
    )
    if args.joint:
        encoders["jointly trained"] = (
            T5EncoderModel.from_pretrained(args.joint / "text_encoder"),
            AutoTokenizer.from_pretrained(args.joint / "tokenizer"),
        )
    for name, (model, tok) in encoders.items():
        for probe_name, (train, test) in probes.items():
            scores = probe_scores(model, tok, train, test)
            print(json.dumps({"encoder": name, "probe": probe_name, **scores}))


if __name__ == "__main__":
    main()
