"""Apps for tests/test_http_e2e.py: a resource server and a calling service, under gunicorn."""
