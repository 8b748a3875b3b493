"""The one error type of the data layer: bad paths, bad files, bad tokens (the CLI exits 2)."""

from __future__ import annotations


class DataError(Exception):
    """Unusable data (bad path or file, empty or too short corpus); the message names the file."""
