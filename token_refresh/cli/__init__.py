"""The ``token-refresh`` command line: ``inspect``, ``demo``, ``token`` and ``agent``."""

from __future__ import annotations

from ._main import main

__all__ = ["main"]
