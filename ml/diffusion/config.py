"""The text-to-image model's configuration: T5 encoder + U-Net diffusion, and how it trains.

The defaults are the toy profile, sized by measurement on a 2-core CPU (see the class
docstring); a real profile sets `text_encoder_path` (a pretrained T5, frozen), `vae_path` (latent
diffusion), a larger U-Net and mixed precision.
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

MIXED_PRECISION = ("no", "fp16", "bf16")
TOKENIZERS = ("bpe", "byte")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class DiffusionConfig:
    """Everything `build_pipeline` and `train_diffusion` need; JSON on disk.

    The defaults are the toy profile, chosen by measurement on this 2-core CPU (prompt
    following as `ml.eval.oracle` scores it, 36 held-out single-object prompts, DDIM 25 steps,
    guidance 3; chance is 0.125 for colour and 0.111 for position).

    Text encoder. The paper conditions on T5. The toy profile builds a small random
    `T5EncoderModel` trained jointly with the U-Net (a frozen random encoder cannot learn what a
    word means) on a byte-level BPE learned from the training captions: 5x shorter sequences
    than ByT5's bytes (`tokenizer="byte"`, the paper's character-level option), ~30% more
    images/s. A real profile points `text_encoder_path` at a local pretrained T5 and sets
    `train_text_encoder=False`, as the paper does.

    U-Net. Capacity at full resolution decides whether the model learns objects at all: with
    DESIGN.md's (16, 32, 64) x 1 layer the samples had the prompt's background but
    multi-coloured blobs for objects, at chance on colour and position after 600-2000 steps at
    32 px, with clean three-word captions of single objects too (colour 0.22, position 0.22
    after 1000 steps at 16 px); (32, 64, 64) x 2 layers reached colour 0.44 / position 0.89 on
    the same clean-caption run. It costs 2.5x the compute per image, so the toy model works at
    16 px (ShapeWorld's 32 px renders downsampled; the oracle still reads colour 98% and
    position 100% right on them). Cross-attention sits in the two lowest levels (8x8 and 4x4 at
    16 px) and the mid block: on ground-truth descriptive captions of 1-4 objects, the 4x4 level
    alone gave colour 0.24 / position 0.06 after 3000 steps, 8x8 and 4x4 colour 0.28 / position
    0.19 after 1500; on the pipeline's DSC captions, 1500 steps, 0.25 / 0.14 against 0.14 / 0.08,
    for 1.65x the compute per image; the 16x16 level too would cost another 2.5x. These figures
    were taken with a DDIM that clamped its x0 estimate under guidance, which left stray blobs
    and understated position most (see `build_pipeline`); sampled without the clamp, the
    default model trained 3000 steps on the pipeline's DSC captions follows colour 0.39 and
    position 0.90 (72 prompts). With
    `vae_path` set the U-Net works on that local `AutoencoderKL`'s latents instead
    (`image_size` stays the pixel size).

    Noise schedule. Cosine ("squaredcos_cap_v2") with v-prediction: epsilon prediction on a
    linear schedule left grey, noisy backgrounds after the same 1000 steps. Sampling uses DDIM
    or DPM-Solver on the same schedule with "trailing" spacing, so the first sampling step
    starts from pure noise.
    """

    image_size: int = 16
    # text encoder
    text_encoder_path: str = ""  # a local pretrained T5 directory; "" builds the toy encoder
    tokenizer: str = "bpe"  # toy encoder: "bpe" learned from the training captions, or "byte"
    vocab_size: int = 512  # of the "bpe" tokenizer
    train_text_encoder: bool = True
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_ff_dim: int = 256
    max_text_length: int = 128  # tokens; bytes for ByT5, which covers a toy DSC caption
    # U-Net
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 2
    attention_head_dim: int = 8
    cross_attention_levels: int = 2  # the lowest-resolution levels that cross-attend the text
    norm_num_groups: int = 8
    vae_path: str = ""  # a local AutoencoderKL directory; "" trains in pixel space
    # noise schedule
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    # training
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    caption_dropout: float = 0.1  # the share of empty captions that classifier-free guidance needs
    mixed_precision: str = "no"
    num_workers: int = 0  # DataLoader workers; 0 reads in the training process
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    sample_every: int = 200  # 0 turns sample grids off

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)  # JSON gives a list
        positive = (
            "image_size", "vocab_size", "text_dim", "text_layers", "text_heads", "text_ff_dim",
            "max_text_length", "layers_per_block", "attention_head_dim", "cross_attention_levels",
            "norm_num_groups", "num_train_timesteps", "steps", "batch_size", "log_every",
            "checkpoint_every", "keep_checkpoints",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.block_out_channels) < 2:
            raise ValueError("block_out_channels needs at least two levels")
        if self.cross_attention_levels > len(self.block_out_channels):
            raise ValueError(
                f"cross_attention_levels ({self.cross_attention_levels}) exceeds the U-Net's "
                f"{len(self.block_out_channels)} levels"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block_out_channels entry must divide by norm_num_groups="
                f"{self.norm_num_groups}, got {self.block_out_channels}"
            )
        if self.image_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(
                f"image_size {self.image_size} must divide by 2 per U-Net downsampling"
            )
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "DiffusionConfig":
        """Reads a saved config; unknown fields are an error, missing ones take the default."""
        data = json.loads(Path(path).read_text())
        unknown = sorted(data.keys() - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown}")
        return cls(**data)
