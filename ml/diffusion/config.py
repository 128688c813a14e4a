"""The text-to-image stages' configs: the T5 encoder + U-Net diffusion model, its consistency
distillation, how each trains and how each is scored. Apart from the model code, so the
Dagster code location reads them without torch.

The defaults are the toy profile, sized by measurement on a 2-core CPU (docs/benchmarks.md,
"Design measurements"); a real profile sets `text_encoder_path` (a pretrained T5, frozen), a
larger U-Net and mixed precision, and points `image_autoencoder.source` at SD's VAE.
"""

from dataclasses import dataclass, field

from ml.config import TrainConfig
from ml.eval.oracle import PromptFollowingConfig

TOKENIZERS = ("bpe", "byte")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_levels(
    block_out_channels: tuple[int, ...], norm_num_groups: int, image_size: int, network: str
) -> None:
    """What a diffusers encoder-decoder of these levels needs: channels that GroupNorm can
    split, and a side that every downsampling halves exactly."""
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(
            f"every block_out_channels entry must divide by norm_num_groups="
            f"{norm_num_groups}, got {block_out_channels}"
        )
    if image_size % 2 ** (len(block_out_channels) - 1):
        raise ValueError(f"image_size {image_size} must divide by 2 per {network} downsampling")


def _toy_train() -> TrainConfig:
    return TrainConfig(
        steps=3000, batch_size=32, lr=2e-3, warmup_steps=50, ema_decay=0.995, log_every=10,
        checkpoint_every=100,
    )  # fmt: skip


@dataclass
class DiffusionConfig:
    """Everything `build_pipeline` and the `diffusion_model` stage need.

    The toy text encoder is a small random T5 trained with the U-Net on a BPE learned from the
    training captions (a frozen random encoder cannot learn what a word means); cross-attention
    sits in the lowest-resolution levels; cosine schedule with v-prediction. Why each of these:
    docs/benchmarks.md, "Design measurements".
    """

    image_size: int = 32  # pixels; the U-Net's side is this over the autoencoder's downsampling
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
    text_cache_size: int = 50_000  # captions whose frozen encoder's states are kept; 0: none
    # U-Net
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 2
    attention_head_dim: int = 8
    cross_attention_levels: int = 3  # the lowest-resolution levels that cross-attend the text
    norm_num_groups: int = 8
    # noise schedule
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    # training
    caption_dropout: float = 0.1  # the share of empty captions that classifier-free guidance needs
    num_workers: int = 0  # DataLoader workers; 0 reads in the training process
    sample_every: int = 1000  # sample grids of the EMA weights; 0 turns them off
    train: TrainConfig = field(default_factory=_toy_train)
    eval: PromptFollowingConfig = field(default_factory=PromptFollowingConfig)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)  # JSON gives a list
        positive = (
            "image_size", "vocab_size", "text_dim", "text_layers", "text_heads", "text_ff_dim",
            "max_text_length", "layers_per_block", "attention_head_dim", "cross_attention_levels",
            "norm_num_groups", "num_train_timesteps",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "sample_every", "text_cache_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.block_out_channels) < 2:
            raise ValueError("block_out_channels needs at least two levels")
        if self.cross_attention_levels > len(self.block_out_channels):
            raise ValueError(
                f"cross_attention_levels ({self.cross_attention_levels}) exceeds the U-Net's "
                f"{len(self.block_out_channels)} levels"
            )
        check_levels(self.block_out_channels, self.norm_num_groups, self.image_size, "U-Net")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )


def _toy_autoencoder_train() -> TrainConfig:
    return TrainConfig(
        steps=1500, batch_size=32, lr=1e-3, warmup_steps=50, log_every=10, checkpoint_every=100
    )


@dataclass
class AutoencoderConfig:
    """The `image_autoencoder` stage: diffusers' `AutoencoderKL`, trained on ShapeWorld renders
    (`source: toy`) or a pretrained one (SD's VAE) copied from a local folder.

    Each level past the first halves the side, so the toy's three take 32-px images to 8x8x4
    latents. The loss is L1 plus a small KL term, which keeps the latents near a unit Gaussian
    without blurring flat colours; the latents' scaling factor is measured after training.
    """

    source: str = "toy"  # "toy", or a local AutoencoderKL directory
    split: str = "train"  # raw_pairs' split of renders it learns from
    image_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    kl_weight: float = 1e-6
    eval_images: int = 512  # of the eval split, for PSNR
    train: TrainConfig = field(default_factory=_toy_autoencoder_train)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)  # JSON gives a list
        for name in ("image_size", "layers_per_block", "latent_channels", "norm_num_groups",
                     "eval_images"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_levels(self.block_out_channels, self.norm_num_groups, self.image_size, "autoencoder")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.split == "eval":
            raise ValueError("split: the autoencoder is scored on 'eval', so it cannot learn it")


def _toy_distill() -> TrainConfig:
    return TrainConfig(
        steps=600, batch_size=16, lr=2e-4, warmup_steps=20, log_every=10, checkpoint_every=100
    )


@dataclass
class DistillConfig:
    """How the student learns and how it is scored; the defaults are the toy profile's."""

    num_ddim_timesteps: int = 50  # the teacher's solver skeleton: one step skips 1000 / 50
    guidance_min: float = 1.0  # the guidance scales w the student learns to imitate
    guidance_max: float = 5.0
    guidance_embedding_dim: int = 64
    target_ema_decay: float = 0.95
    huber_c: float = 0.001
    timestep_scaling: float = 10.0  # sharpens the boundary scalings around t = 0, as in LCM
    text_cache_size: int = 50_000  # captions whose (frozen) teacher states are kept; 0: none
    train: TrainConfig = field(default_factory=_toy_distill)
    eval: PromptFollowingConfig = field(
        default_factory=lambda: PromptFollowingConfig(sampling_steps=2)
    )

    def __post_init__(self) -> None:
        for name in ("num_ddim_timesteps", "guidance_embedding_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1.0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(
                f"need 1 <= guidance_min <= guidance_max, got {self.guidance_min}, "
                f"{self.guidance_max}"
            )
        if not 0 < self.target_ema_decay < 1:
            raise ValueError(f"target_ema_decay must be in (0, 1), got {self.target_ema_decay}")
