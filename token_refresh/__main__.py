"""``python -m token_refresh``: the ``token-refresh`` command, from :mod:`token_refresh.cli`."""

from __future__ import annotations

from token_refresh.cli import main

raise SystemExit(main())
