"""gunicorn settings for tests/test_prefork.py: the documented ``post_fork`` hook."""

from __future__ import annotations

# Recent gunicorn (27 here) opens a control socket under ~/.gunicorn by default:
# the tests need none, and parallel runs would share it. Older ones ignore this.
control_socket_disable = True


def post_fork(server: object, worker: object) -> None:
    """In each new worker: reset the inherited scheduler, then schedule the worker's session.

    ``after_fork()`` is idempotent; the at-fork hook that ``os.fork()`` ran has
    normally done it already.
    """
    from prefork import app  # imported by the master already, with --preload

    app.scheduler.after_fork()
    app.start_worker_session()
