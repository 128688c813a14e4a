"""The `clip_encoder` stage's config: where the CLIP comes from, and the toy one's architecture
and training. Apart from `ml.clip`, so the Dagster code location reads it without torch."""

from dataclasses import dataclass, field
from typing import Any

from ml.config import TrainConfig

SOURCES = ("toy", "pretrained")
# ShapeWorld pixels span the whole [0, 1] range, so centre them without a dataset pass.
TOY_MEAN = (0.5, 0.5, 0.5)
TOY_STD = (0.5, 0.5, 0.5)
VOCAB_SIZE = 49408  # open_clip's BPE vocabulary, which its default tokenizer needs offline


def _toy_train() -> TrainConfig:
    # About 12 minutes on one CPU thread: docs/benchmarks.md.
    return TrainConfig(
        steps=1600, batch_size=128, lr=3e-3, warmup_steps=20, log_every=50, checkpoint_every=400
    )


@dataclass
class ClipConfig:
    """Where the CLIP comes from and, for the toy source, its architecture and training.

    The architecture fields mirror open_clip's `vision_cfg`/`text_cfg` keys, `vision_layers`
    included: four block counts build open_clip's ModifiedResNet (the RN50 family), one int a
    vision transformer of that depth cut into `patch_size` patches. The toy default is a small
    ResNet, because the captioner must read shapes from the CLIP's feature map; why, and what
    width and hard negatives buy: docs/benchmarks.md, "Design measurements".
    """

    source: str = "toy"
    model_name: str = "ViT-B-32"  # pretrained: an open_clip architecture name
    checkpoint: str = ""  # pretrained: a local weights file; nothing is ever downloaded
    embed_dim: int = 32
    image_size: int = 32
    vision_layers: int | tuple[int, ...] = (1, 1, 1, 1)  # ResNet stages, or ViT depth
    vision_width: int = 32
    vision_head_width: int = 16
    patch_size: int = 4  # ViT only
    text_width: int = 32
    text_layers: int = 3
    text_heads: int = 2
    context_length: int = 64
    max_shift: int = 2  # random translation in pixels; never a flip, as positions are facts
    hard_negatives: bool = True  # add each scene's caption with one shape changed as a negative
    train: TrainConfig = field(default_factory=_toy_train)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"ClipConfig.source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "pretrained" and not self.checkpoint:
            raise ValueError("ClipConfig.checkpoint is required when source is 'pretrained'")
        if isinstance(self.vision_layers, list):  # as YAML and JSON give it
            self.vision_layers = tuple(self.vision_layers)
        if self.is_resnet:
            if len(self.vision_layers) != 4 or self.image_size % 32:
                raise ValueError(
                    "ClipConfig.vision_layers: a ResNet takes 4 stage depths and an image_size "
                    f"divisible by 32, got {self.vision_layers} at {self.image_size}"
                )
        elif self.image_size % self.patch_size:
            raise ValueError(
                f"ClipConfig.patch_size ({self.patch_size}) must divide "
                f"image_size ({self.image_size})"
            )

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision_layers, tuple)

    def model_cfg(self) -> dict[str, Any]:
        """The toy architecture as open_clip's `model_cfg` dict (the schema of its JSON configs)."""
        vision = {
            "image_size": self.image_size,
            "layers": list(self.vision_layers) if self.is_resnet else self.vision_layers,
            "width": self.vision_width,
            "head_width": self.vision_head_width,
        }
        if not self.is_resnet:
            vision["patch_size"] = self.patch_size
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": vision,
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": VOCAB_SIZE,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }

    def preprocess_cfg(self) -> dict[str, Any]:
        """Resize (a no-op on 32-pixel ShapeWorld images), centre crop, normalise."""
        return {
            "size": self.image_size,
            "mean": TOY_MEAN,
            "std": TOY_STD,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        }
