"""The ``token-refresh`` command line: ``inspect``, ``demo`` and ``demo --issuer``."""

from __future__ import annotations

from ._main import main

__all__ = ["main"]
