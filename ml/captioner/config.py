"""The captioner stages' configs: the model's shape and each stage's training. Apart from the
model code, so the Dagster code location reads them without torch."""

from dataclasses import dataclass, field

from ml.config import TrainConfig


@dataclass
class CaptionerConfig:
    clip_dim: int = 128  # width of the pooled CLIP image embedding F(i)
    token_grid: int = 0  # side of the CLIP's patch-token grid; 0 conditions on F(i) only
    token_dim: int = 0  # width of each patch token
    token_stride: int = 2  # patch tokens merged per prefix position along each side
    prefix_length: int = 4  # LM embeddings that F(i) is mapped to
    n_layer: int = 3
    n_embd: int = 128
    n_head: int = 4
    max_caption_tokens: int = 80  # bos + caption + eos

    @property
    def patch_tokens(self) -> int:
        return self.token_grid**2

    @property
    def feature_dim(self) -> int:
        """Width of one row of the features tensor the captioner takes."""
        return self.clip_dim + self.patch_tokens * self.token_dim

    @property
    def condition_length(self) -> int:
        """Positions the image takes at the start of every sequence."""
        merged_grid = -(-self.token_grid // self.token_stride)
        return self.prefix_length + merged_grid**2


@dataclass
class CaptionerStageConfig:
    """One stage's training; `model` and `vocab_size` only shape the base (fine-tunes inherit)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: CaptionerConfig = field(default_factory=CaptionerConfig)
    vocab_size: int = 512
    max_new_tokens: int = 80
    patch_tokens: bool = True  # also condition on the CLIP's grid of image tokens
