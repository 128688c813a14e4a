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

    Text encoder. The paper conditions on T5. The toy profile builds a small random
    `T5EncoderModel` with transformers' byte-level `ByT5Tokenizer` (no vocabulary file, and
    character-level input is what the paper names as the fix for rendering text). It trains
    jointly with the U-Net (`train_text_encoder=True`) because a frozen random encoder can never
    learn what a word means. Measured on single-object ShapeWorld (DSC captions, p=0.95, 900
    steps at batch 32, 96 held-out prompts), joint and frozen were both still at chance, so
    the measurement does not separate them yet; frozen costs ~15% less per step. A real
    profile points `text_encoder_path` at a local pretrained T5 directory and sets
    `train_text_encoder=False`, as the paper does.

    U-Net. Pixel space at 32x32 on toy, cross-attention only at the lowest (8x8) resolution
    and in the mid block: attention at 16x16 cut CPU throughput from ~65 to ~20 images/s
    (DESIGN.md section 4). With `vae_path` set, the U-Net works on the latents of that local
    `AutoencoderKL` instead (`image_size` stays the pixel size).

    Noise schedule. Cosine ("squaredcos_cap_v2"), which suits small images, with
    v-prediction: it weighs the x0 error at least 1 at every noise level, where epsilon
    prediction weighs it by the SNR, close to 0 at the high noise levels that decide colour
    and layout. Measured: after 300 steps the v-model drew clean flat backgrounds where the
    epsilon model's samples were still covered in noise. Sampling uses DDIM or DPM-Solver on
    the same schedule with "trailing" spacing, so the first sampling step starts from pure
    noise.

    Training. lr 2e-3 with batch 32 is DESIGN.md's working setting; 600 steps is about five
    minutes at the ~65 images/s of an idle 2-core CPU (40-53 images/s measured here while other
    jobs shared it). That budget learns plausible backgrounds and object blobs, but not yet
    prompt following: with free-text captions colour and position (`ml/eval/oracle.py`) were
    still at chance after 900 steps (batch 32) and 1200 steps (batch 16), and with DESIGN.md's
    clean three-token captions colour reached only 0.22 (chance 0.125) after 600 steps.
    """

    image_size: int = 32
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
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    vae_path: str = ""  # a local AutoencoderKL directory; "" trains in pixel space
    # noise schedule
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    # training
    steps: int = 600
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
            "max_text_length", "layers_per_block", "attention_head_dim", "norm_num_groups",
            "num_train_timesteps", "steps", "batch_size", "log_every", "checkpoint_every",
            "keep_checkpoints",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.block_out_channels) < 2:
            raise ValueError("block_out_channels needs at least two levels")
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
