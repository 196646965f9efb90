"""Keep session tokens fresh: refresh each one on a timer before it expires."""

from __future__ import annotations

import logging

from . import events
from ._context import current_session_id
from ._format import format_duration
from ._jwt import decode_jwt_expiry, decode_jwt_payload
from ._retry import RetryPolicy
from ._scheduler import Scheduler, SchedulerClosedError, Stats

__all__ = [
    "RetryPolicy",
    "Scheduler",
    "SchedulerClosedError",
    "Stats",
    "current_session_id",
    "decode_jwt_expiry",
    "decode_jwt_payload",
    "events",
    "format_duration",
]

__version__ = "0.2.0"

logging.getLogger("token_refresh").addHandler(logging.NullHandler())
