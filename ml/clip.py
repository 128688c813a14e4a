"""The `clip_encoder` stage: the CLIP behind the captioner's F(i) and behind CLIP-S.

Two sources (DESIGN.md section 2): a pretrained open_clip model from a local checkpoint, or,
in the toy profile where no hub is reachable, a small CLIP trained contrastively on
ShapeWorld's descriptive captions. Either way the model is an `open_clip.CLIP` saved in
open_clip's own local-dir layout, so `open_clip.create_model_and_transforms('local-dir:...')`
loads it with no code from this project.
"""

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import save as safetensors_bytes

from ml.clip_config import ClipConfig
from ml.data.sample import Sample
from ml.data.shapeworld import SHAPES, Scene, descriptive_caption, scene_of, visible_colors
from ml.files import check_weights, write_atomic, write_json
from ml.stage import NO_LOG, Log
from ml.train import Shuffled, TrainResult, train

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"  # the name open_clip's local-dir loader prefers
TEXT_CHUNK = 32  # captions per length-sorted chunk when encoding for evaluation
MAX_LOGIT_SCALE = math.log(100)  # open_clip's clamp, so the temperature cannot run away

Preprocess = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[str | list[str]], torch.Tensor]


def build_toy_clip(cfg: ClipConfig) -> open_clip.CLIP:
    """A freshly initialised toy CLIP that carries its preprocess config, as open_clip's
    factory leaves its models; seeded without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = open_clip.CLIP(**cfg.model_cfg())
    set_model_preprocess_cfg(model, cfg.preprocess_cfg())
    return model


def toy_transforms(cfg: ClipConfig) -> tuple[Preprocess, Tokenizer]:
    """The validation preprocess and the tokenizer that `load_clip` gives a saved toy CLIP."""
    preprocess = image_transform_v2(PreprocessCfg(**cfg.preprocess_cfg()), is_train=False)
    return preprocess, open_clip.SimpleTokenizer(context_length=cfg.context_length)


# --- training ---------------------------------------------------------------------------------


def train_toy_clip(
    samples: list[Sample],
    cfg: ClipConfig,
    log: Log = NO_LOG,
    work: Path | None = None,
    resume: bool = True,
) -> tuple[open_clip.CLIP, TrainResult]:
    """Train a toy CLIP with the CLIP loss on images and descriptive captions of their scenes.

    In-batch negatives alone are too easy: captions of different scenes differ in many words,
    so the loss falls near zero while the image tower still confuses a square with a circle.
    With `hard_negatives`, each image also meets its own scene's caption with one object's
    shape changed (NegCLIP's recipe), which only an encoder that sees shapes can reject.
    Captions are written afresh each step from the scene graph (a new template and object
    order), and the pair of true and altered captions shares one template, so the shape word
    is all that tells them apart. Images are preprocessed once up front: at 32 pixels that is
    a few MB. `work` keeps checkpoints (see `ml.train.train`).
    """
    if cfg.source != "toy":
        raise ValueError(f"ClipConfig.source must be 'toy' to train, got {cfg.source!r}")
    if len(samples) < cfg.train.batch_size:
        raise ValueError(
            f"need at least batch_size={cfg.train.batch_size} samples, got {len(samples)}"
        )
    model = build_toy_clip(cfg)
    preprocess, tokenizer = toy_transforms(cfg)
    scenes = [scene_of(s) for s in samples]
    if cfg.hard_negatives and None in scenes:
        raise ValueError(
            "clip_encoder.hard_negatives needs ShapeWorld scene graphs, which these samples "
            "lack (a webdataset source): set hard_negatives: false"
        )
    images = torch.stack([preprocess(s.image) for s in samples])
    fixed = [reference_caption(s) for s in samples]

    batches = Shuffled(
        len(samples),
        cfg.train.batch_size,
        cfg.train.seed,
        lambda index, gen: clip_batch(images, scenes, fixed, tokenizer, cfg, index, gen),
    )
    result = train([ContrastiveLoss(model)], lambda modules, batch, _: modules[0](*batch),
                   batches, cfg.train, log, work, resume)  # fmt: skip
    return model, result


def encode_tokens(model: open_clip.CLIP, token_ids: torch.Tensor, chunks: int) -> torch.Tensor:
    """L2-normalised text embeddings, the text tower run on length-sorted chunks, each cut to
    its own longest caption.

    Causal attention and pooling at the end-of-text token make what follows a caption
    irrelevant to its embedding, so this is the maths of open_clip's `encode_text` over all
    context positions, without the padding's share of the compute.
    """
    if model.text_pool_type != "argmax":
        raise ValueError(f"needs end-of-text pooling, got {model.text_pool_type!r}")
    lengths = token_ids.argmax(dim=-1) + 1  # the end-of-text token has the highest id
    features = []
    order = lengths.argsort()
    for chunk in order.chunk(chunks):
        n = int(lengths[chunk].max())
        ids = token_ids[chunk, :n]
        x = model.token_embedding(ids) + model.positional_embedding[:n]
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
        x = x[torch.arange(len(ids), device=x.device), ids.argmax(dim=-1)]
        projection = model.text_projection
        linear = isinstance(projection, torch.nn.Linear)
        features.append(projection(x) if linear else x @ projection)
    return F.normalize(torch.cat(features)[order.argsort()], dim=-1)


class ContrastiveLoss(torch.nn.Module):
    """The CLIP loss of a batch of images, their captions and (optionally) one hard negative
    caption each, as one module so that DDP sees one forward; the text tower runs as
    `encode_tokens`."""

    def __init__(self, model: open_clip.CLIP, chunks: int = 4) -> None:
        super().__init__()
        if model.text_pool_type != "argmax":
            raise ValueError(f"needs end-of-text pooling, got {model.text_pool_type!r}")
        self.model, self.chunks = model, chunks

    def forward(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        with torch.no_grad():
            m.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        device = m.logit_scale.device
        image_features = m.encode_image(pixels.to(device), normalize=True)
        text_features = encode_tokens(m, token_ids.to(device), self.chunks)
        logit_scale = m.logit_scale.exp()
        n = len(pixels)
        positives, negatives = text_features[:n], text_features[n:]
        labels = torch.arange(n, device=device)
        image_logits = logit_scale * image_features @ torch.cat([positives, negatives]).T
        text_logits = logit_scale * positives @ image_features.T
        return (F.cross_entropy(image_logits, labels) + F.cross_entropy(text_logits, labels)) / 2


def clip_batch(
    images: torch.Tensor,
    scenes: list[Scene | None],
    fixed: list[str],
    tokenizer: Tokenizer,
    cfg: ClipConfig,
    index: list[int],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (images, token ids) of one batch. The token ids hold one caption per image (written
    afresh from its scene, or its `fixed` caption where it has none), then (with
    `hard_negatives`) one shape-altered caption per image."""
    rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
    true_captions, false_captions = [], []
    for i in index:
        template = rng.random()
        if scenes[i] is None:
            true_captions.append(fixed[i])
            continue
        true_captions.append(descriptive_caption(scenes[i], random.Random(template)))
        if cfg.hard_negatives:
            altered = change_one(scenes[i], rng, "shape")
            false_captions.append(descriptive_caption(altered, random.Random(template)))
    token_ids = tokenizer(true_captions + false_captions)
    return _shift(images[index], cfg.max_shift, generator), token_ids


def _shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels, filling in with its edge pixels.

    A small shift keeps every object in its grid cell, so captions stay true.
    """
    if max_shift == 0:
        return images
    padded = F.pad(images, [max_shift] * 4, mode="replicate")
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    return torch.stack(
        [
            p[:, y : y + size, x : x + size]
            for p, (y, x) in zip(padded, offsets.tolist(), strict=True)
        ]
    )


# --- saving and loading -----------------------------------------------------------------------


def save_clip(model: open_clip.CLIP, cfg: ClipConfig, out_dir: Path) -> None:
    """Write `model` in open_clip's local-dir layout: a JSON config and safetensors weights.

    Weights go first and the config last, each written atomically, so a folder with a config
    always has the weights that belong to it.
    """
    model_cfg = (
        cfg.model_cfg() if cfg.source == "toy" else open_clip.get_model_config(cfg.model_name)
    )
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out_dir / WEIGHTS_FILE, safetensors_bytes(weights))
    write_json(out_dir / CONFIG_FILE, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})


def load_clip(source: str | Path | ClipConfig) -> tuple[open_clip.CLIP, Preprocess, Tokenizer]:
    """Load a CLIP saved by `save_clip` (a folder) or a pretrained one (a 'pretrained' config).

    Returns the model in eval mode, its validation preprocess and its tokenizer.
    """
    if isinstance(source, ClipConfig):
        if source.source != "pretrained":
            raise ValueError(
                "ClipConfig.source must be 'pretrained' to load from a config; "
                "a toy CLIP is loaded from the folder save_clip wrote"
            )
        if not Path(source.checkpoint).is_file():
            raise FileNotFoundError(f"CLIP checkpoint not found: {source.checkpoint}")
        name, pretrained = source.model_name, source.checkpoint
    else:
        if not (Path(source) / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"no {CONFIG_FILE} in CLIP folder: {source}")
        check_weights(Path(source))
        name, pretrained = f"local-dir:{source}", None
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


# --- encoding and evaluation ------------------------------------------------------------------


@torch.inference_mode()
def encode_images(
    model: open_clip.CLIP,
    preprocess: Preprocess,
    images: Sequence[Image.Image],
    batch_size: int = 256,
) -> torch.Tensor:
    """L2-normalised image embeddings, one row per image."""
    model.eval()
    chunks = [
        model.encode_image(
            torch.stack([preprocess(im) for im in images[i : i + batch_size]]), normalize=True
        )
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


@torch.inference_mode()
def encode_texts(
    model: open_clip.CLIP, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised text embeddings, one row per text; with end-of-text pooling each batch
    runs as length-sorted chunks of about `TEXT_CHUNK` captions (`encode_tokens`)."""
    model.eval()
    batches = []
    for i in range(0, len(texts), batch_size):
        ids = tokenizer(list(texts[i : i + batch_size]))
        if model.text_pool_type == "argmax":
            batches.append(encode_tokens(model, ids, max(1, len(ids) // TEXT_CHUNK)))
        else:
            batches.append(model.encode_text(ids, normalize=True))
    return torch.cat(batches)


def reference_caption(sample: Sample) -> str:
    """The best caption a sample has: its descriptive caption, else its alt-text."""
    return sample.meta.get("descriptive_caption") or sample.text


def change_one(scene: Scene, rng: random.Random, attribute: str) -> Scene:
    """The same scene with one object's `attribute` ('color' or 'shape') changed; a new colour
    is one that still shows on the background."""
    i = rng.randrange(len(scene.objects))
    obj = scene.objects[i]
    if attribute == "color":
        choices = [c for c in visible_colors(scene.background) if c != obj.color]
    elif attribute == "shape":
        choices = [s for s in SHAPES if s != obj.shape]
    else:
        raise ValueError(f"attribute must be 'color' or 'shape', got {attribute!r}")
    changed = replace(obj, **{attribute: rng.choice(choices)})
    return replace(scene, objects=scene.objects[:i] + (changed,) + scene.objects[i + 1 :])
