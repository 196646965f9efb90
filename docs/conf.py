"""Sphinx configuration: Markdown pages (MyST), the furo theme, autodoc for the API.

Build with warnings as errors, as CI does (tests/test_docs.py)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

No intersphinx: the build needs no network.
"""

from __future__ import annotations

import token_refresh

project = "token_refresh"
author = "the token_refresh authors"
project_copyright = "the token_refresh authors; MIT licence"
release = version = token_refresh.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_scripts", "examples"]
nitpicky = True
# Without intersphinx, references to the standard library's types cannot resolve.
nitpick_ignore_regex = [
    (
        "py:class",
        r"(collections\.abc|datetime|random|types|typing|threading|os|ssl|redis|opentelemetry)\..*",
    ),
    ("py:class", r"Callable|timedelta|TracebackType|Literal|Random"),
    # ManualClock.call_later's handle: all a caller may do with it is cancel().
    ("py:class", r"token_refresh\.testing\._ManualTimer"),
    # instrument() makes an Instrumentation; its constructor's instruments are private.
    ("py:class", r"token_refresh\.otel\._Meters"),
]

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "separated"

html_theme = "furo"
html_title = f"token_refresh {release}"
html_static_path = ["_static"]
