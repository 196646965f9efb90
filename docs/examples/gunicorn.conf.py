"""gunicorn settings for flask_app.py: ``gunicorn -c docs/examples/gunicorn.conf.py``."""

from __future__ import annotations

import os

wsgi_app = "flask_app:app"
pythonpath = os.path.dirname(os.path.abspath(__file__))  # where flask_app.py is
bind = "127.0.0.1:8000"
workers = 2
# Threads per worker: a request may wait on the upstream API (the example's stand-in for
# one is this same app), and a refresh never blocks a request meanwhile.
threads = 4
# Import the app, and so create its Scheduler, once in the master; the workers
# are forks of it. Without preload each worker imports the app itself, and the
# hooks below work the same way.
preload_app = True


def post_fork(server: object, worker: object) -> None:
    """In each new worker, before it serves: fetch this worker's token, schedule its refresh."""
    import flask_app  # already imported by the master, with preload_app

    # Optional: the scheduler notices the fork by itself. Harmless to call.
    flask_app.service_token.scheduler.after_fork()
    flask_app.service_token.start()


def worker_exit(server: object, worker: object) -> None:
    """In a worker that is shutting down: stop its refreshes, waiting up to 5 s for one running."""
    import flask_app

    flask_app.service_token.scheduler.close(timeout=5)
