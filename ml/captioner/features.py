"""The frozen CLIP's view of an image, as the rows of features the captioner reads.

Computed once per image and cached in one tensor, so the CLIP never runs during captioner
training. A row is F(i), the L2-normalised pooled embedding that `ml.clip.encode_images`
returns, optionally followed by the vision transformer's last-layer patch tokens (through its
final LayerNorm, as the pooled token is), flattened in row-major order: a toy CLIP's pooled
vector keeps too little of where each object is and what it looks like (see
`ml.captioner.model`).
"""

from collections.abc import Sequence

import open_clip
import torch
from PIL import Image

from ml.clip import Preprocess


@torch.no_grad()
def clip_features(
    clip: open_clip.CLIP,
    preprocess: Preprocess,
    images: Sequence[Image.Image],
    patch_tokens: bool = True,
    batch_size: int = 256,
) -> torch.Tensor:
    """(len(images), clip_dim [+ grid * grid * token_dim]) features."""
    clip.eval()
    rows = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(image) for image in images[start : start + batch_size]])
        out = clip.forward_intermediates(
            image=pixels,
            image_indices=1,  # the last block
            normalize=True,
            normalize_intermediates=True,
            image_output_fmt="NCHW",
        )
        pooled = out["image_features"]
        if patch_tokens:
            tokens = out["image_intermediates"][-1]  # (batch, token_dim, grid, grid)
            pooled = torch.cat([pooled, tokens.flatten(2).transpose(1, 2).flatten(1)], dim=1)
        rows.append(pooled)
    return torch.cat(rows)
