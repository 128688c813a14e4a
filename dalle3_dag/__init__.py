"""Dagster code location of dalle3-dag: thin assets that turn config into `ml` calls."""
