"""The ``token-refresh`` command (also ``python -m token_refresh``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ._demo import run_demo


def _speed(text: str) -> float:
    speed = float(text)
    if not 0 < speed < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return speed


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    module_run = Path(sys.argv[0]).parts[-2:] == ("token_refresh", "__main__.py")
    parser = argparse.ArgumentParser(
        prog="python -m token_refresh" if module_run else "token-refresh",
        description="Keep session tokens fresh: refresh each one on a timer before it expires.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="watch a few sessions get their tokens refreshed, live (about 10 seconds)",
        description="Run a few sessions with short-lived tokens on real timers, one token "
        "source failing for a while, and tell the story as it happens (about 10 seconds).",
    )
    demo.add_argument(
        "-v", "--verbose", action="store_true", help="also show the library's DEBUG log on stderr"
    )
    demo.add_argument("--speed", type=_speed, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    logger = logging.getLogger("token_refresh")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)-5s %(name)s: %(message)s"))
    previous_level = logger.level
    if args.verbose:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        return run_demo(sys.stdout, speed=args.speed)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


if __name__ == "__main__":
    raise SystemExit(main())
