"""The local backend: a small T5 (`T5ForConditionalGeneration`) that rewrites prompts.

Built from config with a BPE learned from its own pairs (no hub), or fine-tuned from a local
pretrained T5 folder; trained by the one loop (`ml.train`) and saved with `save_pretrained`, its
decoding length in `generation_config.json`, so the folder loads with transformers alone.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from ml.files import check_weights
from ml.stage import NO_LOG, Log
from ml.tokenizer import IGNORE, caption_tokenizer, pad_rows
from ml.train import Shuffled, TrainResult, model_loss, train
from ml.upsampler.config import UpsamplerConfig


def build_model(cfg: UpsamplerConfig, corpus: Sequence[str]) -> tuple[Any, Any]:
    """(model, tokenizer): the pretrained T5 at `cfg.pretrained`, or a toy one, dropout off so
    training is a pure function of the seed and the step."""
    if cfg.pretrained:
        folder = Path(cfg.pretrained)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"prompt_upsampler.pretrained: no T5 folder at {folder}")
        return T5ForConditionalGeneration.from_pretrained(folder), AutoTokenizer.from_pretrained(
            folder
        )
    tokenizer = caption_tokenizer(corpus, cfg.vocab_size)
    shape = cfg.model
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=shape.d_model,
        d_kv=shape.d_kv,
        d_ff=shape.d_ff,
        num_layers=shape.num_layers,
        num_decoder_layers=shape.num_layers,
        num_heads=shape.num_heads,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.train.seed)
    return T5ForConditionalGeneration(config), tokenizer


def train_upsampler(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    cfg: UpsamplerConfig,
    log: Log = NO_LOG,
    work: Path | None = None,
    resume: bool = True,
) -> TrainResult:
    """Teacher-forced cross-entropy of each target given its source, on shuffled pairs."""
    sources = tokenizer([s for s, _ in pairs], truncation=True, max_length=cfg.max_source_tokens)
    targets = tokenizer([t for _, t in pairs], truncation=True, max_length=cfg.max_new_tokens)
    pad = tokenizer.pad_token_id

    def make(indices: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_rows([sources.input_ids[i] for i in indices], pad)
        labels, label_mask = pad_rows([targets.input_ids[i] for i in indices], pad)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels.masked_fill(label_mask == 0, IGNORE),
        }

    batches = Shuffled(len(pairs), cfg.train.batch_size, cfg.train.seed, make)
    return train([model], model_loss, batches, cfg.train, log, work, resume)


class LocalUpsampler:
    """Prompts -> descriptive prompts with a saved upsampler folder: greedy decoding, or
    sampling at `temperature` seeded per call, so a (prompts, seed) pair always reads the same."""

    backend = "local"

    def __init__(self, model: Any, tokenizer: Any, temperature: float = 0.0) -> None:
        self.model, self.tokenizer, self.temperature = model.eval(), tokenizer, temperature

    @classmethod
    def from_pretrained(cls, folder: Path, temperature: float = 0.0) -> "LocalUpsampler":
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no prompt upsampler at {folder} (missing config.json)")
        model = T5ForConditionalGeneration.from_pretrained(check_weights(folder))
        return cls(model, AutoTokenizer.from_pretrained(folder), temperature)

    def save_pretrained(self, folder: Path, max_new_tokens: int) -> None:
        self.model.generation_config.max_new_tokens = max_new_tokens
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seed: int = 0, batch_size: int = 64) -> list[str]:
        out: list[str] = []
        sampling = self.temperature > 0
        for start in range(0, len(prompts), batch_size):
            batch = self.tokenizer(
                list(prompts[start : start + batch_size]), return_tensors="pt", padding=True
            ).to(self.model.device)
            with torch.random.fork_rng():
                torch.manual_seed(seed + start)
                ids = self.model.generate(
                    **batch,
                    do_sample=sampling,
                    temperature=self.temperature if sampling else None,
                    top_k=None,
                    top_p=None,
                    num_beams=1,
                )
            out += [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return out
