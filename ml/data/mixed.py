"""The blended training set: the paper's sampling-time mix of synthetic and original captions.

The `mixed_training_set` asset is only a manifest (shards, their caption sidecars, which
synthetic caption to use, the synthetic ratio p and a seed); nothing is copied. At sampling
time each example takes its synthetic caption with probability p and its original alt-text
otherwise (the paper uses p = 0.95), so the model stays usable with short, human-style prompts.

The pick is a hash of (seed, epoch, key), not a draw from a random generator, so it does not
depend on the number of ranks or workers or the order samples arrive in: every process agrees
on every sample's caption, reruns reproduce it, and a new epoch gives a new pick.
"""

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ml.data.recaption import ALT_TEXT, read_sidecar
from ml.files import write_atomic

CAPTION_TYPES = ("alt", "ssc", "dsc")  # "alt" is the baseline: original captions only
# Every value `choose_caption` returns as `which`, i.e. where a caption came from.
SOURCES = ("synthetic", "original", "fallback_original", "fallback_synthetic", "empty")


def check_mix(blend: "MixManifest | MixConfig") -> None:
    """The blend settings both the stage's config and its manifest must satisfy."""
    if blend.caption_type not in CAPTION_TYPES:
        raise ValueError(f"caption_type must be one of {CAPTION_TYPES}, got {blend.caption_type!r}")
    ratio = blend.synthetic_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        raise ValueError(f"synthetic_ratio must be a number in [0, 1], got {ratio!r}")
    blend.synthetic_ratio = float(ratio)
    if blend.caption_type == "alt" and blend.synthetic_ratio != 0:
        # Refused rather than ignored, so a sweep cannot silently train the baseline.
        raise ValueError("synthetic_ratio must be 0 when caption_type is 'alt'")
    if isinstance(blend.seed, bool) or not isinstance(blend.seed, int):
        raise ValueError(f"seed must be an integer, got {blend.seed!r}")


@dataclass
class MixManifest:
    """What the training loader blends. JSON on disk; the `mixed_training_set` asset.

    `shards` are local paths or s3:// URIs; `sidecars[i]` is the local sidecar of `shards[i]`.
    Relative local paths in a saved manifest are relative to its folder, so a manifest can
    point into the asset store without machine-specific paths (and DVC hashes stay stable).
    """

    shards: list[str]
    sidecars: list[str]
    caption_type: str
    synthetic_ratio: float
    seed: int

    def __post_init__(self) -> None:
        for name in ("shards", "sidecars"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name} must be a list of non-empty strings, got {value!r}")
        if not self.shards:
            raise ValueError("shards must list at least one shard")
        if len(self.sidecars) != len(self.shards):
            raise ValueError(
                f"sidecars must be parallel to shards: {len(self.sidecars)} sidecars "
                f"for {len(self.shards)} shards"
            )
        check_mix(self)

    def save(self, path: Path) -> None:
        """Writes the manifest as JSON, atomically."""
        text = json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
        write_atomic(Path(path), text.encode())

    @classmethod
    def load(cls, path: Path) -> "MixManifest":
        """Reads a saved manifest, resolving relative local paths against its folder."""
        path = Path(path)
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a manifest must be a JSON object")
        expected = {f.name for f in fields(cls)}
        for name in sorted(expected ^ data.keys()):
            kind = "missing" if name in expected else "unknown"
            raise ValueError(f"{path}: {kind} field {name!r}")
        manifest = cls(**data)
        manifest.shards = [_resolve(uri, path.parent) for uri in manifest.shards]
        manifest.sidecars = [_resolve(uri, path.parent) for uri in manifest.sidecars]
        return manifest


def _resolve(uri: str, base: Path) -> str:
    if uri.startswith("s3://") or Path(uri).is_absolute():
        return uri
    return str(base / uri)


def uniform(seed: int, epoch: int, key: str) -> float:
    """A uniform number in [0, 1) that depends only on (seed, epoch, key)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def choose_caption(
    key: str, epoch: int, seed: int, p: float, synthetic: str | None, original: str | None
) -> tuple[str, str]:
    """(caption, which): the synthetic caption with probability p, else the original.

    A missing or blank caption falls back to the other one, so no example trains on an empty
    prompt when a real one exists; `which` says so ("fallback_original" when the synthetic
    caption was picked but blank, "fallback_synthetic" the other way round, "empty" when both
    are blank) so the caller can count how often the blend differs from p.
    """
    synthetic = synthetic if synthetic and synthetic.strip() else None
    original = original if original and original.strip() else None
    if uniform(seed, epoch, key) < p:
        if synthetic is not None:
            return synthetic, "synthetic"
        return (original, "fallback_original") if original is not None else ("", "empty")
    if original is not None:
        return original, "original"
    return (synthetic, "fallback_synthetic") if synthetic is not None else ("", "empty")


def choose(
    manifest: MixManifest, epoch: int, key: str, synthetic: str | None, original: str | None
) -> tuple[str, str]:
    """choose_caption with the manifest's settings; the "alt" baseline has no synthetic caption."""
    if manifest.caption_type == "alt":
        synthetic = None
    return choose_caption(key, epoch, manifest.seed, manifest.synthetic_ratio, synthetic, original)


def shard_order(manifest: MixManifest, epoch: int) -> list[int]:
    """Indices of the manifest's shards in this epoch's order: a seeded shuffle per epoch."""
    order = list(range(len(manifest.shards)))
    random.Random(f"{manifest.seed}/{epoch}").shuffle(order)
    return order


def mix_stats(manifest: MixManifest, epoch: int) -> dict[str, Any]:
    """How one epoch blends, for the asset's metadata: a count per caption source.

    Computed from the sidecars alone (no image is read): they hold every sample the shard
    reader delivered, with its alt-text, so the counts equal what `MixedDataset` yields.
    """
    counts = Counter({source: 0 for source in SOURCES})
    for sidecar in manifest.sidecars:
        for key, row in read_sidecar(Path(sidecar)).items():
            _, which = choose(manifest, epoch, key, row.get(manifest.caption_type), row[ALT_TEXT])
            counts[which] += 1
    samples = sum(counts.values())
    synthetic = counts["synthetic"] + counts["fallback_synthetic"]
    return {
        "epoch": epoch,
        "samples": samples,
        **counts,
        "synthetic_frac": round(synthetic / samples, 4) if samples else 0.0,
    }


@dataclass
class MixConfig:
    """The `mixed_training_set` stage's parameters (the paper's blend: 95% DSC)."""

    caption_type: str = "dsc"
    synthetic_ratio: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        check_mix(self)
