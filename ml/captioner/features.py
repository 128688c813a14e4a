"""The frozen CLIP's view of an image, as the rows of features the captioner reads.

Computed once per image and cached in one tensor, so the CLIP never runs during captioner
training. A row is F(i), the L2-normalised pooled embedding that `ml.clip.encode_images`
returns, optionally followed by a grid of tokens from inside the image tower, flattened in
row-major order: a toy CLIP's pooled vector keeps too little of where each object is and what
it looks like (see `ml.captioner.model`).
"""

from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from PIL import Image

from ml.clip import Preprocess


def encode_with_tokens(
    clip: open_clip.CLIP, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """F(i) of preprocessed images, L2-normalised as `ml.clip.encode_images` gives it, and a
    (batch, token_dim, grid, grid) grid of tokens, each layer-normalised; one pass of the tower.

    A ResNet gives the map after its first stage (stride 4: 8x8 for 32-pixel images), the
    finest one past the stem; its later stages pool ShapeWorld's objects away (1x1 at the
    end). A vision transformer gives its last block's patch tokens, through its final
    LayerNorm, as the pooled token goes.
    """
    visual = clip.visual
    if isinstance(visual, ModifiedResNet):
        # ModifiedResNet.forward, stage by stage, keeping the first stage's map.
        first = visual.layer1(visual.stem(pixels.to(visual.conv1.weight.dtype)))
        pooled = visual.attnpool(visual.layer4(visual.layer3(visual.layer2(first))))
        tokens = F.layer_norm(first.transpose(1, 3), first.shape[1:2]).transpose(1, 3)
        return F.normalize(pooled, dim=-1), tokens
    out = clip.forward_intermediates(
        image=pixels,
        image_indices=1,  # the last block
        normalize=True,
        normalize_intermediates=True,
        image_output_fmt="NCHW",
    )
    return out["image_features"], out["image_intermediates"][-1]


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
        if patch_tokens:
            pooled, tokens = encode_with_tokens(clip, pixels)
            rows.append(torch.cat([pooled, tokens.flatten(2).transpose(1, 2).flatten(1)], dim=1))
        else:
            rows.append(clip.encode_image(pixels, normalize=True))
    return torch.cat(rows)
