"""Recycling a worker process: moved to :mod:`meepo.runtime.runner` (the run loop,
signals and recycling in one place); these names stay importable from here."""

from __future__ import annotations

from .runner import GENERATION_ENV, SECRET_OPTIONS, exec_again, generation, rss_mb, without_secrets

__all__ = [
    "GENERATION_ENV",
    "SECRET_OPTIONS",
    "exec_again",
    "generation",
    "rss_mb",
    "without_secrets",
]
