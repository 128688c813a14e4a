"""The toy counterpart of a pretrained T5: a small T5 learns the world's own text (its captions
and prompts, as C4 is to T5) with T5's span-corruption objective, and its encoder is saved in
T5's layout with its tokenizer, so the diffusion model loads it frozen through
`text_encoder_path`, the code path of a real profile's t5-v1_1 folder.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerBase,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

from ml.config import TrainConfig
from ml.diffusion.pipeline import toy_t5_config
from ml.stage import NO_LOG, Log
from ml.tokenizer import IGNORE, caption_tokenizer, pad_rows
from ml.train import Shuffled, TrainResult, model_loss, train


def _pretrain_train() -> TrainConfig:
    return TrainConfig(steps=3000, batch_size=128, lr=2e-3, warmup_steps=100, log_every=50)


@dataclass
class TextPretrainConfig:
    """The encoder's shape (the diffusion model's toy encoder's), a one-layer decoder that only
    trains it, and T5's corruption: 15% of the tokens dropped in spans of mean length 3."""

    vocab_size: int = 512
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_ff_dim: int = 256
    decoder_layers: int = 1
    max_text_length: int = 128
    noise_density: float = 0.15
    mean_span: float = 3.0
    sentinels: int = 32
    train: TrainConfig = field(default_factory=_pretrain_train)

    def __post_init__(self) -> None:
        if not 0 < self.noise_density < 1:
            raise ValueError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_span < 1:
            raise ValueError(f"mean_span must be >= 1, got {self.mean_span}")


def world_text(samples: list[Any]) -> list[str]:
    """Every text the world writes about each sample: its alt-text, short and descriptive
    captions (`ml.data.shapeworld.generate`'s)."""
    texts = []
    for sample in samples:
        texts += [sample.text, sample.meta["short_caption"], sample.meta["descriptive_caption"]]
    return [text for text in texts if text]


def _lengths(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` cut into `parts` positive lengths at random."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def corrupt_spans(
    ids: list[int], sentinels: list[int], density: float, mean_span: float, rng: random.Random
) -> tuple[list[int], list[int]]:
    """(input, target) ids as T5 pretrains: spans covering `density` of `ids` are each replaced
    in the input by the next sentinel; the target lists each sentinel and the span it hides."""
    n = len(ids)
    if n < 2:
        return list(ids), [sentinels[0]]
    noise = min(max(1, round(n * density)), n - 1)
    spans = max(1, min(round(noise / mean_span), noise, n - noise, len(sentinels)))
    noise_lengths, keep_lengths = _lengths(noise, spans, rng), _lengths(n - noise, spans, rng)
    source, target, at = [], [], 0
    for i, (keep, drop) in enumerate(zip(keep_lengths, noise_lengths, strict=True)):
        source += ids[at : at + keep] + [sentinels[i]]
        target += [sentinels[i]] + ids[at + keep : at + keep + drop]
        at += keep + drop
    return source, target


def _sentinels(cfg: TextPretrainConfig) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(cfg.sentinels)]  # T5's names


def build_tokenizer(texts: list[str], cfg: TextPretrainConfig) -> PreTrainedTokenizerBase:
    """The diffusion model's toy BPE learned from `texts`, plus T5's sentinel tokens."""
    tokenizer = caption_tokenizer(texts, cfg.vocab_size)
    tokenizer.add_tokens(_sentinels(cfg), special_tokens=True)
    tokenizer.model_max_length = cfg.max_text_length
    return tokenizer


def pretrain_text_encoder(
    texts: list[str], cfg: TextPretrainConfig, log: Log = NO_LOG, work: Path | None = None
) -> tuple[T5EncoderModel, PreTrainedTokenizerBase, TrainResult]:
    """(the pretrained encoder, its tokenizer, the loop's result) on `texts` by span corruption,
    in the one training loop (`ml.train`): resumable from `work`, a function of the seed."""
    tokenizer = build_tokenizer(texts, cfg)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sentinels = tokenizer.convert_tokens_to_ids(_sentinels(cfg))
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True).input_ids
    encoded = [ids[: cfg.max_text_length - 1] for ids in encoded]
    config = toy_t5_config(
        cfg, tokenizer, num_decoder_layers=cfg.decoder_layers, decoder_start_token_id=pad
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = T5ForConditionalGeneration(config)

    def make(indices: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
        pairs = [
            corrupt_spans(encoded[i], sentinels, cfg.noise_density, cfg.mean_span, rng)
            for i in indices
        ]
        input_ids, attention_mask = pad_rows([source + [eos] for source, _ in pairs], pad)
        labels, label_mask = pad_rows([target + [eos] for _, target in pairs], pad)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels.masked_fill(label_mask == 0, IGNORE),
        }

    batches = Shuffled(len(encoded), cfg.train.batch_size, cfg.train.seed, make)
    result = train([model], model_loss, batches, cfg.train, log, work, resume=work is not None)
    encoder = T5EncoderModel(config)
    missing, _ = encoder.load_state_dict(model.state_dict(), strict=False)  # drops the decoder
    if missing:
        raise RuntimeError(f"the pretrained model lacks encoder weights: {missing[:3]}")
    return encoder.eval().requires_grad_(False), tokenizer, result


def save_text_encoder(
    encoder: T5EncoderModel, tokenizer: PreTrainedTokenizerBase, directory: Path
) -> None:
    """T5's own layout: `T5EncoderModel.from_pretrained` and `AutoTokenizer.from_pretrained`
    load it, as they load a downloaded t5-v1_1 folder."""
    encoder.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
