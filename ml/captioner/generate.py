"""Batched caption generation with the KV cache.

Every image's prefix has the same length, so a batch needs no prompt padding: batched and
one-at-a-time greedy decoding compute the same thing. Rows that finish early are filled with
eos, which decoding drops, until the longest caption ends.

Greedy decoding writes a caption's most likely phrasing every time; nucleus sampling (`top_p`,
as BLIP's CapFilt recaptions) keeps the phrasings the captioner learned in their proportions.
"""

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ml.captioner.features import clip_features
from ml.captioner.model import Captioner
from ml.clip import load_clip


@torch.no_grad()
def generate_captions(
    model: Captioner,
    features: torch.Tensor,
    max_new_tokens: int = 80,
    top_p: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """One caption per row of `features`: greedy when `top_p` is 0, else sampled from the
    smallest set of tokens holding `top_p` of the probability, from `seed` (the global RNG is
    left as it was)."""
    model.eval()
    tok = model.tokenizer
    prefix = model.prefix(features)
    bos = torch.full((len(features), 1), tok.bos_token_id)
    embeds = torch.cat([prefix, model.lm.get_input_embeddings()(bos)], dim=1)
    sampling = {"do_sample": True, "top_p": top_p, "top_k": 0} if top_p else {"do_sample": False}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = model.lm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),  # nothing is padded
            max_new_tokens=max_new_tokens,
            num_beams=1,
            use_cache=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            # Fill finished rows with eos, not pad: the LM then never sees its pad id, and
            # transformers does not warn that the input looks padded without a mask.
            pad_token_id=tok.eos_token_id,
            **sampling,
        )
    return [text.strip() for text in tok.batch_decode(output, skip_special_tokens=True)]


class ImageCaptioner:
    """Images in, captions out: the frozen CLIP's features, then batched decoding, greedy or
    (`top_p`) sampled from a seed of `seed` and the batch's pixels, so the same images get
    the same captions in any run or call order."""

    def __init__(
        self,
        clip_dir: Path,
        captioner_dir: Path,
        max_new_tokens: int = 80,
        top_p: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.clip, self.preprocess, _ = load_clip(clip_dir)
        self.model = Captioner.from_pretrained(captioner_dir)
        self.max_new_tokens = max_new_tokens
        self.top_p, self.seed = top_p, seed

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        patch_tokens = self.model.config.token_grid > 0
        features = clip_features(self.clip, self.preprocess, images, patch_tokens)
        seed = batch_seed(images, self.seed) if self.top_p else 0
        return generate_captions(self.model, features, self.max_new_tokens, self.top_p, seed)


def batch_seed(images: Sequence[Image.Image], seed: int) -> int:
    """A sampling seed from `seed` and the images' pixels."""
    digest = hashlib.sha256(str(seed).encode())
    for image in images:
        digest.update(image.tobytes())
    return int.from_bytes(digest.digest()[:8], "little")
