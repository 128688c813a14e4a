"""Data stages: generation, shard reading/writing and the record they pass around."""
