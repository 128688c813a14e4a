"""Batched caption generation with the KV cache.

Every image's prefix has the same length, so a batch needs no prompt padding: batched and
one-at-a-time greedy decoding compute the same thing. Rows that finish early are filled with
eos, which decoding drops, until the longest caption ends.
"""

import torch

from ml.captioner.model import Captioner


@torch.no_grad()
def generate_captions(
    model: Captioner, features: torch.Tensor, max_new_tokens: int = 80, num_beams: int = 1
) -> list[str]:
    """One caption per row of `features`; greedy (deterministic) when `num_beams` is 1."""
    model.eval()
    tok = model.tokenizer
    prefix = model.prefix(features)
    bos = torch.full((len(features), 1), tok.bos_token_id)
    embeds = torch.cat([prefix, model.lm.get_input_embeddings()(bos)], dim=1)
    output = model.lm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),  # nothing is padded
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=False,
        use_cache=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        # Fill finished rows with eos, not pad: the LM then never sees its pad id, and
        # transformers does not warn that the input looks padded without a mask.
        pad_token_id=tok.eos_token_id,
    )
    return [text.strip() for text in tok.batch_decode(output, skip_special_tokens=True)]
