"""Exceptions a user can act on, at the bottom of the package (no torch or detectron2 import).

The tools print any :class:`ConfigError` (and so any :class:`CheckpointError`) as one line and exit with status 2;
everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "NucleiD2Error"]


class NucleiD2Error(Exception):
    """Base of nuclei-d2's own errors."""


class ConfigError(NucleiD2Error, ValueError):
    """A configuration problem the user can fix (the message says how)."""


class CheckpointError(ConfigError):
    """A weights file that cannot be loaded safely or does not fit the model (the message names the file)."""
