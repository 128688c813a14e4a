"""Batched caption generation with the KV cache.

Every image's prefix has the same length, so a batch needs no prompt padding: batched and
one-at-a-time greedy decoding compute the same thing. Rows that finish early are filled with
eos, which decoding drops, until the longest caption ends.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ml.captioner.features import clip_features
from ml.captioner.model import Captioner
from ml.clip import load_clip


@torch.no_grad()
def generate_captions(
    model: Captioner, features: torch.Tensor, max_new_tokens: int = 80
) -> list[str]:
    """One greedy (deterministic) caption per row of `features`."""
    model.eval()
    tok = model.tokenizer
    prefix = model.prefix(features)
    bos = torch.full((len(features), 1), tok.bos_token_id)
    embeds = torch.cat([prefix, model.lm.get_input_embeddings()(bos)], dim=1)
    output = model.lm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),  # nothing is padded
        max_new_tokens=max_new_tokens,
        num_beams=1,
        do_sample=False,
        use_cache=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        # Fill finished rows with eos, not pad: the LM then never sees its pad id, and
        # transformers does not warn that the input looks padded without a mask.
        pad_token_id=tok.eos_token_id,
    )
    return [text.strip() for text in tok.batch_decode(output, skip_special_tokens=True)]


class ImageCaptioner:
    """Images in, captions out: the frozen CLIP's features, then batched greedy decoding."""

    def __init__(self, clip_dir: Path, captioner_dir: Path, max_new_tokens: int = 80) -> None:
        self.clip, self.preprocess, _ = load_clip(clip_dir)
        self.model = Captioner.from_pretrained(captioner_dir)
        self.max_new_tokens = max_new_tokens

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        patch_tokens = self.model.config.token_grid > 0
        features = clip_features(self.clip, self.preprocess, images, patch_tokens)
        return generate_captions(self.model, features, self.max_new_tokens)
