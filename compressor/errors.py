"""Typed errors a user can cause. The CLI prints their message on one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: bad config, missing path, unusable data or artifact.

    The message must say what was wrong and what to do about it.
    """


class ConfigError(UserError):
    """A config value is missing, unknown, of the wrong type or out of range."""


class DataError(UserError):
    """A dataset cannot be used (empty, unreadable, corrupted, too small)."""


class ModelError(UserError):
    """A model or pruned-model artifact cannot be loaded."""


class ArtifactError(UserError):
    """A run-directory artifact is missing, truncated, tampered with or stale."""
