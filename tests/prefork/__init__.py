"""A Flask app and server settings for tests/test_prefork.py (real gunicorn and uWSGI)."""
