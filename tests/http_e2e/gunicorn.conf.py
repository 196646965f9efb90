"""gunicorn settings for tests/test_http_e2e.py."""

from __future__ import annotations

control_socket_disable = True  # as in tests/prefork/gunicorn.conf.py
worker_class = "gthread"
