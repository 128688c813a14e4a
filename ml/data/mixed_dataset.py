"""`MixedDataset`: the training loader's view of a `mixed_training_set` manifest, a torch
`IterableDataset` that blends captions at sampling time (the rule is `ml.data.mixed`)."""

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ml.data.mixed import MixManifest, choose, shard_order
from ml.data.recaption import read_sidecar
from ml.data.sample import Sample
from ml.data.shards import ReadStats, read_shard


class MixedDataset(IterableDataset):
    """Streams (image, blended caption) examples from a manifest, each exactly once per epoch.

    The epoch is split over `world_size` ranks x DataLoader workers ("slots"):
    - at least as many shards as slots: shards go round-robin to slots in an order shuffled
      per epoch with the seed, so each shard is read by one slot only;
    - fewer shards than slots (toy data): every slot reads every shard and keeps sample i of the
      j-th shard of the epoch's order when (i + j) % slots is its slot. That balances slots to
      within one sample per shard and stays local to a shard, but each slot decodes every
      image, so it only suits small data.
    Slots may get unequal numbers of samples (shards differ in size), so a DDP loop must cope
    with uneven ends (e.g. torch.distributed.algorithms.Join); nothing is padded or dropped.

    Call `set_epoch` before creating each epoch's DataLoader iterator; workers copy the
    dataset when the iterator starts, so with `persistent_workers=True` the epoch would not
    reach them. `caption_counts` counts `caption_source` values of the current iteration in
    this process only: each worker keeps its own copy, so the caller must sum per-worker
    counts, most simply by counting `batch["caption_source"]`; `mix_stats` gives a whole
    epoch's counts in one process.
    """

    def __init__(
        self,
        manifest: MixManifest,
        transform: Callable[[Image.Image], Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if rank is None or world_size is None:
            initialised = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
        if not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.manifest = manifest
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.caption_counts: Counter[str] = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.caption_counts = Counter()
        for sample, synthetic in self._slot_samples():
            caption, which = choose(self.manifest, self.epoch, sample.key, synthetic, sample.text)
            self.caption_counts[which] += 1
            yield {
                "key": sample.key,
                "image": self.transform(sample.image) if self.transform else sample.image,
                "caption": caption,
                "caption_source": which,
            }

    def _slot_samples(self) -> Iterator[tuple[Sample, str | None]]:
        """This slot's share of the epoch, each sample with its synthetic caption (if any)."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        slots = self.world_size * workers
        slot = self.rank * workers + worker
        order = shard_order(self.manifest, self.epoch)
        split_shards = len(order) >= slots
        for j, index in enumerate(order):
            if split_shards and j % slots != slot:
                continue
            captions = read_sidecar(Path(self.manifest.sidecars[index]))
            samples = read_shard(self.manifest.shards[index], ReadStats())
            for i, sample in enumerate(samples):
                if split_shards or (i + j) % slots == slot:
                    # A key missing from the sidecar (a stale one) falls back to its alt-text.
                    yield sample, captions.get(sample.key, {}).get(self.manifest.caption_type)
