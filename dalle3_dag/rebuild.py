"""What a rebuild must run: the assets and shard partitions that are missing or stale, as the
Dagster UI sees them (code version: the stage's code and params; data version: the DVC hash),
and everything downstream of what reruns.

Dagster's stale status only marks an asset whose parents already changed; a rebuild must also
rerun what sits below an asset it is about to rerun, so `Rebuild` walks the graph in order and
carries that forward.
"""

from collections.abc import Iterable
from typing import Any

import dagster as dg
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContext


class _Request(LoadingContext):
    """The batch-loading scope Dagster's stale-status resolver reads the instance through."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self._instance, self._loaders = instance, {}

    @property
    def instance(self) -> dg.DagsterInstance:
        return self._instance

    @property
    def loaders(self) -> dict:
        return self._loaders


class Rebuild:
    """Decides, asset by asset in graph order, what to materialize.

    Ask about an asset only once everything upstream of it has run: a partitioned asset's
    partitions (and their status) can change when its parents rerun.
    """

    def __init__(
        self, instance: dg.DagsterInstance, graph: Any, force: bool = False
    ) -> None:
        self.instance, self.graph, self.force = instance, graph, force
        self.rerun: set[dg.AssetKey] = set()
        self.refresh()

    def refresh(self) -> None:
        """Forget cached statuses: call after materializing something."""
        request = _Request(self.instance)
        self.resolver = CachingStaleStatusResolver(self.instance, self.graph, request)

    def _outdated(self, key: dg.AssetKey, partition: str | None = None) -> bool:
        return self.resolver.get_status(key, partition) != StaleStatus.FRESH

    def partitions(self, key: dg.AssetKey) -> list[str]:
        """The partitions of `key` to materialize (all of them or none for an unpartitioned
        asset, as `[""]` or `[]`); remembers that `key` reruns when there are any."""
        node = self.graph.get(key)
        upstream = self.force or bool(node.parent_keys & self.rerun)
        if node.partitions_def is None:
            chosen = [""] if upstream or self._outdated(key) else []
        else:
            every = node.partitions_def.get_partition_keys(dynamic_partitions_store=self.instance)
            chosen = every if upstream else [p for p in every if self._outdated(key, p)]
        if chosen:
            self.rerun.add(key)
        return chosen


def spans(chosen: Iterable[str], every: list[str]) -> list[tuple[str, str]]:
    """The chosen partitions as runs of neighbours in `every`: (first, last) for each
    `--partition-range`."""
    wanted, runs, previous = set(chosen), [], -2
    for i, key in enumerate(every):
        if key in wanted:
            if i == previous + 1:
                runs[-1] = (runs[-1][0], key)
            else:
                runs.append((key, key))
            previous = i
    return runs


def one_run(
    instance: dg.DagsterInstance, graph: Any, selected: Iterable[dg.AssetKey]
) -> list[dg.AssetKey]:
    """What one scheduled run can rebuild of the `selected` assets: the missing or stale
    unpartitioned ones, less those downstream of shard partitions that must rerun first (eager
    automation reruns the partitions; the next run takes what follows them)."""
    rebuild, chosen, waiting, selected = Rebuild(instance, graph), [], set(), set(selected)
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if not node.is_materializable or key not in selected:
            continue
        if node.parent_keys & waiting:
            waiting.add(key)
        elif node.partitions_def is None:
            if rebuild.partitions(key):
                chosen.append(key)
        elif rebuild.partitions(key) or not instance.get_dynamic_partitions(
            node.partitions_def.name
        ):
            waiting.add(key)
    return chosen
