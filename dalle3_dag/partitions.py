"""Partitions shared between assets: one per training shard of `raw_pairs`."""

import dagster as dg

SHARDS = dg.DynamicPartitionsDefinition(name="raw_pairs_shards")


def sync_shard_partitions(instance: dg.DagsterInstance, shards: list[str]) -> None:
    """Make the shard partitions match the shards that exist: new shards become partitions."""
    wanted = {name.removesuffix(".tar") for name in shards}
    current = set(instance.get_dynamic_partitions(SHARDS.name))
    for stale in sorted(current - wanted):
        instance.delete_dynamic_partition(SHARDS.name, stale)
    if wanted - current:
        instance.add_dynamic_partitions(SHARDS.name, sorted(wanted - current))
