"""Text encoders for the diffusion model, side by side: what their states say about the scene.

    python bench/bench_text_encoder.py --out DIR [--steps 3000] [--samples 8192] [--joint DIR]

Pretrains the toy T5 on the world's text (`ml.diffusion.text_pretraining`: alt-texts, short and
descriptive captions of `--samples` train-split scenes; never the eval split) and saves its
encoder and tokenizer to DIR in T5's layout (what `--text-encoder` of `bench_latent.py t2i` and
`text_encoder_path` load). Then probes each encoder's masked-mean states with a logistic
regression fitted on one-object train-split captions and scored on eval-split ones: the
object's colour, shape and cell (chance 1/7 or less, 1/3, 1/9). Encoders: the same T5 at its
random initialisation; the pretrained one; with `--joint`, the text encoder of a trained
pipeline folder (trained with the U-Net, today's recipe). One JSON line each.
"""

import argparse
import json
import time
from pathlib import Path

import torch
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
    for what in ASKED:
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
    start = time.time()
    encoder, tokenizer, result = pretrain_text_encoder(texts, cfg, ConsoleLog(args.out / "log"))
    save_text_encoder(encoder, tokenizer, args.out)
    print(json.dumps({
        "pretrained": str(args.out), "texts": len(texts), "steps": result.steps,
        "wall_s": round(time.time() - start), "final_loss": round(result.final_loss, 3),
    }))  # fmt: skip

    train, test = one_object("train", 2048), one_object("eval", 512)
    random_init = T5EncoderModel(encoder.config)
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
        print(json.dumps({"encoder": name, **probe_scores(model, tok, train, test)}))


if __name__ == "__main__":
    main()
