"""What a training step reads instead of recomputing it from frozen models.

`Posteriors`: the frozen autoencoder's posterior of every training image, encoded once per
training run. A step looks up its batch's moments by sample key and draws its latents with its
own generator (`TextToImagePipeline.draw_latents`): the draw re-encoding the pixels would give,
without the encoder's forward pass each step. The file lives in the run's checkpoint folder,
already one per (config, input versions) (`ml.stage.Inputs.checkpoints`), and records the
autoencoder it came from, so a folder reused with another one re-encodes.

`TextStates`: a frozen text encoder's states per distinct caption, kept in memory as captions
recur (each is seen once per epoch), up to a bound.
"""

import hashlib
import json
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch.nn.utils.rnn import pad_sequence

from ml.diffusion.autoencoder import images_tensor
from ml.diffusion.pipeline import TextToImagePipeline, encode_prompts
from ml.files import write_atomic
from ml.stage import NO_LOG, Log

POSTERIORS = "posteriors.safetensors"


class Posteriors:
    """Posterior moments (mean and log-variance stacked on channels) by sample key."""

    def __init__(self, keys: Sequence[str], moments: torch.Tensor, fingerprint: str) -> None:
        self.index = {key: row for row, key in enumerate(keys)}
        if len(self.index) != len(keys):
            twice = sorted(k for k, n in Counter(keys).items() if n > 1)[:3]
            raise ValueError(f"sample keys appear twice in the training set: {twice}")
        if len(keys) != len(moments):
            raise ValueError(f"{len(keys)} keys for {len(moments)} posteriors")
        self.moments, self.fingerprint = moments, fingerprint

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, keys: Sequence[str]) -> torch.Tensor:
        missing = [key for key in keys if key not in self.index]
        if missing:
            raise KeyError(
                f"no cached posterior for sample {missing[0]!r}: the training set changed "
                "after its posteriors were encoded"
            )
        return self.moments[[self.index[key] for key in keys]]

    def save(self, path: Path) -> None:
        metadata = {"keys": json.dumps(list(self.index)), "fingerprint": self.fingerprint}
        write_atomic(Path(path), save({"moments": self.moments.contiguous()}, metadata))

    @classmethod
    def load(cls, path: Path) -> "Posteriors":
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata()
            moments = file.get_tensor("moments")
        return cls(json.loads(metadata["keys"]), moments, metadata["fingerprint"])


def fingerprint(pipe: TextToImagePipeline, image_size: int) -> str:
    """What an image's moments depend on besides the image: the autoencoder's weights and the
    size images are resized to."""
    digest = hashlib.sha256(str(image_size).encode())
    if pipe.vae is not None:
        for name, tensor in sorted(pipe.vae.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_posteriors(
    pipe: TextToImagePipeline,
    examples: Iterable[dict[str, Any]],
    image_size: int,
    batch_size: int = 256,
    autoencoder: str | None = None,
) -> Posteriors:
    """The moments of every {"key", "image"} example, encoded `batch_size` at a time;
    `autoencoder` is `fingerprint(pipe, image_size)` where the caller has it already."""
    keys: list[str] = []
    moments: list[torch.Tensor] = []
    chunk: list[dict[str, Any]] = []
    device = pipe.vae.device if pipe.vae is not None else torch.device("cpu")

    def flush() -> None:
        pixels = images_tensor([example["image"] for example in chunk], image_size)
        # The encoder returns channels-last tensors; the file gives back contiguous ones, and a
        # posterior draw differs in its last bit between the two layouts: store one layout, so
        # a resumed run draws what an uninterrupted one does.
        moments.append(pipe.image_moments(pixels.to(device)).float().cpu().contiguous())
        keys.extend(example["key"] for example in chunk)
        chunk.clear()

    for example in examples:
        chunk.append(example)
        if len(chunk) == batch_size:
            flush()
    if chunk:
        flush()
    if not keys:
        raise ValueError("the training set has no images to encode")
    return Posteriors(keys, torch.cat(moments), autoencoder or fingerprint(pipe, image_size))


def posteriors_for(
    pipe: TextToImagePipeline,
    examples: Iterable[dict[str, Any]],
    image_size: int,
    work: Path | None,
    log: Log = NO_LOG,
    write: bool = True,
) -> Posteriors:
    """The moments of `examples` (the whole training set), read from `work` when this
    autoencoder encoded them there, else encoded now and saved there when `write` (one writer
    per folder under several processes)."""
    path = Path(work) / POSTERIORS if work is not None else None
    wanted = fingerprint(pipe, image_size)
    if path is not None and path.is_file():
        cached = Posteriors.load(path)
        if cached.fingerprint == wanted:
            log.info(f"read the posteriors of {len(cached)} training images from {path}")
            return cached
        log.info(f"{path} was encoded by another autoencoder: encoding again")
    start = time.perf_counter()
    posteriors = encode_posteriors(pipe, examples, image_size, autoencoder=wanted)
    log.info(
        f"encoded the posteriors of {len(posteriors)} training images once, "
        f"in {time.perf_counter() - start:.1f} s"
    )
    if path is not None and write:
        path.parent.mkdir(parents=True, exist_ok=True)
        posteriors.save(path)
    return posteriors


class TextStates:
    """`encode_prompts` for a frozen encoder, each distinct caption encoded once and alone: its
    states are then a function of the caption, not of the batch it first came in, so a resumed
    run reads what an uninterrupted one does. The oldest are dropped beyond `capacity`
    captions; with 0 every batch is encoded as it comes. A batch is padded to its longest
    caption, with the mask `encode_prompts` gives; the encoder masks padding, so the states
    of a caption's tokens are those of its batch's encoding, to rounding."""

    def __init__(self, pipe: TextToImagePipeline, capacity: int) -> None:
        if any(p.requires_grad for p in pipe.text_encoder.parameters()):
            raise ValueError("only a frozen text encoder's states can be cached")
        self.pipe, self.capacity = pipe, capacity
        self.states: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.capacity == 0:
            return encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, captions)
        found = {}
        for caption in dict.fromkeys(captions):
            if caption in self.states:
                found[caption] = self.states[caption]
                continue
            states, _ = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, [caption])
            found[caption] = states[0]
            if len(self.states) >= self.capacity:
                self.states.popitem(last=False)
            self.states[caption] = found[caption]
        states = pad_sequence([found[caption] for caption in captions], batch_first=True)
        lengths = torch.tensor([len(found[caption]) for caption in captions])
        mask = torch.arange(states.shape[1])[None, :] < lengths[:, None]
        return states, mask.long().to(states.device)
