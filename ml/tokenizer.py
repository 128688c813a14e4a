"""An offline caption tokenizer, trained on the captions themselves.

Model hubs are unreachable, so instead of GPT-2's vocabulary the captioner and the toy T5 get
a small byte-level BPE learned from their own training text. Byte-level means any string encodes
(no unknown tokens, even for web junk like "IMG_0423.jpg") and decodes back exactly, case
included, so captions keep their capitals and quoted words.
"""

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IGNORE = -100  # cross_entropy's ignore_index: label positions the loss skips


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE with bos/eos/pad tokens, learned from `corpus`.

    It adds no special tokens on its own: the captioner frames each caption as bos ... eos.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


def caption_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE learned from the training captions, ending every text with eos (as T5's
    own tokenizers do), so even the empty prompt of classifier-free guidance is one token."""
    tokenizer = train_tokenizer(corpus, vocab_size)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {tokenizer.eos_token}",
        special_tokens=[(tokenizer.eos_token, tokenizer.eos_token_id)],
    )
    return tokenizer


def pad_rows(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded to the longest, and their attention mask."""
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask
