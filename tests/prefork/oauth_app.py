"""A WSGI app whose workers share one rotating refresh token, for tests/test_prefork.py.

Each gunicorn worker imports this module (no ``--preload``) and builds the same
``SharedToken`` over one ``FileStore`` directory, with a ``RefreshTokenGrant``
whose tokens are always due (``min_ttl`` longer than they live): every request
rotates the refresh token once, under the store's lease, whichever worker takes
it. ``GET /`` answers ``{"pid": ..., "error": null}`` (or the error's type).

The token server, the client secret, the first refresh token and the store
come from ``ROTATION_TOKEN_URL``, ``ROTATION_SECRET``, ``ROTATION_REFRESH_TOKEN``
and ``ROTATION_STORE``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from token_refresh.oauth import RefreshTokenGrant
from token_refresh.shared import FileStore, SharedToken

CLIENT_ID = "rotating-client"

token = SharedToken(
    RefreshTokenGrant(
        os.environ["ROTATION_TOKEN_URL"],
        CLIENT_ID,
        os.environ["ROTATION_SECRET"],
        refresh_token=os.environ["ROTATION_REFRESH_TOKEN"],
    ),
    FileStore(os.environ["ROTATION_STORE"]),
    key="rotation",
    min_ttl=3600,  # longer than the tokens live: every call rotates
    max_age=None,
    rotating=True,
)


def app(environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:
    error = None
    try:
        if token() is None:
            error = "None"
    except Exception as failure:  # reported to the test, which fails on it
        error = type(failure).__name__
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"pid": os.getpid(), "error": error}).encode()]
