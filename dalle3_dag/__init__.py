"""Dagster code location of dalle3-dag: thin assets that turn config into `ml` calls."""

import warnings

from dagster import BetaWarning

# We use observable sources and backfill policies knowingly; their beta notes are noise here.
warnings.filterwarnings("ignore", category=BetaWarning)
