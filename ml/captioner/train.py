"""Maximum-likelihood training of the captioner on (CLIP features, caption) pairs.

The same function serves the three trainings of the paper: pretraining on alt-text and the
two fine-tunes (short and descriptive captions), which differ only in their captions, the
starting weights and the step budget.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from ml.captioner.model import Captioner
from ml.config import TrainConfig
from ml.stage import NO_LOG, Log
from ml.tokenizer import IGNORE
from ml.train import Shuffled, TrainResult, train


@dataclass
class CaptionBatch:
    features: torch.Tensor  # (batch, feature_dim)
    input_ids: torch.Tensor  # (batch, length): bos, caption, eos, then pad
    attention_mask: torch.Tensor  # (batch, length)
    # (batch, condition_length + length), aligned with the LM's whole input as in transformers:
    # IGNORE on the image prefix, on bos and on padding, the token id elsewhere.
    labels: torch.Tensor


def framed(model: Captioner, captions: Sequence[str]) -> list[list[int]]:
    """Each caption's token ids as bos ... eos, cut to the LM's length."""
    tok = model.tokenizer
    limit = model.config.max_caption_tokens - 2
    return [
        [tok.bos_token_id, *tok(c, add_special_tokens=False).input_ids[:limit], tok.eos_token_id]
        for c in captions
    ]


def padded(model: Captioner, features: torch.Tensor, rows: list[list[int]]) -> CaptionBatch:
    """Framed captions right-padded to the longest, with their labels."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), model.tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    caption_labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    caption_labels[:, 0] = IGNORE  # bos always follows the prefix: nothing to learn
    prefix_labels = torch.full((len(rows), model.config.condition_length), IGNORE)
    labels = torch.cat([prefix_labels, caption_labels], dim=1)
    return CaptionBatch(features, input_ids, attention_mask, labels)


def make_batch(model: Captioner, features: torch.Tensor, captions: Sequence[str]) -> CaptionBatch:
    """Frames each caption as bos ... eos, right-padded to the longest, cut to the LM's length."""
    return padded(model, features, framed(model, captions))


def micro_batches(
    model: Captioner, features: torch.Tensor, captions: Sequence[str], parts: int
) -> list[CaptionBatch]:
    """A batch as `parts` length-sorted pieces, each padded to its own longest caption: the same
    tokens to learn as one `make_batch`, with less padding to compute. Each caption is
    tokenized once."""
    rows = framed(model, captions)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    size = -(-len(order) // parts)
    pieces = [order[i : i + size] for i in range(0, len(order), size)]
    return [padded(model, features[p], [rows[i] for i in p]) for p in pieces]


def micro_batch_loss(
    model: Captioner, batches: list[CaptionBatch], forward: torch.nn.Module | None = None
) -> torch.Tensor:
    """The mean token cross-entropy of the whole batch, summed over its pieces: the loss (and
    gradient) of the unsplit batch."""
    total = sum(caption_loss(model, batch, forward, reduction="sum") for batch in batches)
    return total / sum(int((batch.labels != IGNORE).sum()) for batch in batches)


def caption_loss(
    model: Captioner,
    batch: CaptionBatch,
    forward: torch.nn.Module | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Token cross-entropy over caption tokens (and eos) only, their mean or sum.

    The logits are computed at caption positions alone and compared with the labels from
    the caption onwards, so whatever sits at the prefix positions can never enter the loss.
    `forward` is the model as the training loop wrapped it (DDP), if it did.
    """
    device = next(model.parameters()).device
    inputs = (batch.features.to(device), batch.input_ids.to(device))
    logits = (forward or model)(*inputs, batch.attention_mask.to(device))
    targets = batch.labels[:, model.config.condition_length + 1 :].to(device)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction=reduction
    )


def train_captioner(
    model: Captioner,
    features: torch.Tensor,
    captions: Sequence[str],
    cfg: TrainConfig,
    log: Log = NO_LOG,
    work: Path | None = None,
    resume: bool = True,
) -> TrainResult:
    """Teacher-forced training on the pairs whose caption is not empty (see `ml.train.train`).

    Empty alt-texts carry nothing to learn, and would only teach the model to stop at once.
    """
    kept = [i for i, caption in enumerate(captions) if caption.strip()]
    if len(kept) < cfg.batch_size:
        raise ValueError(
            f"{len(kept)} non-empty captions, fewer than one batch of {cfg.batch_size}"
        )
    features, captions = features[kept], [captions[i] for i in kept]
    batches = Shuffled(
        len(kept),
        cfg.batch_size,
        cfg.seed,
        lambda index, _: micro_batches(model, features[index], [captions[i] for i in index], 4),
    )

    def loss_fn(
        modules: list[torch.nn.Module], batch: list[CaptionBatch], _: torch.Generator
    ) -> torch.Tensor:
        return micro_batch_loss(model, batch, modules[0])

    return train([model], loss_fn, batches, cfg, log, work, resume)
