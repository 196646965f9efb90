"""gunicorn settings with no ``post_fork`` hook: os.fork()'s at-fork hook must suffice."""

from __future__ import annotations

control_socket_disable = True  # as in gunicorn.conf.py
