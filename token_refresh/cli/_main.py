"""The ``token-refresh`` command (also ``python -m token_refresh``): its options and errors."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from token_refresh import __version__
from token_refresh.oauth import _checked_url
from token_refresh.shared import InvalidGrant, RateLimited

from ._agent import add_agent_parser, run_agent
from ._demo import run_demo
from ._demo_issuer import run_issuer_demo
from ._inspect import NotAJWTError, inspect_token
from ._token import add_token_parser, run_token

CLIENT_ID_VARIABLE = "TOKEN_REFRESH_CLIENT_ID"
CLIENT_SECRET_VARIABLE = "TOKEN_REFRESH_CLIENT_SECRET"
DEFAULT_CLIENT_ID = "token-refresh-demo"
#: The exit status when the reader of the output has gone (``| head -1``): 128 + SIGPIPE,
#: what a shell reports for a program that the closed pipe stopped.
EXIT_CLOSED_PIPE = 141

EPILOG = f"""\
When the reader of the output goes away (token-refresh inspect < t | head -1), a
command stops quietly with exit status {EXIT_CLOSED_PIPE} (128 + SIGPIPE), as a program
stopped by the closed pipe would (--help and --version still exit 0).
"""

INSPECT_DESCRIPTION = """\
Read a JWT on standard input (an sk-ant-si- prefix is fine) and tell when it
expires, how long is left, when a Scheduler with the given refresh buffer would
refresh it, and the names of its claims. The signature is not verified.
"""

INSPECT_EPILOG = f"""\
exit status: 0 the token is valid, 1 it has expired, 2 it is not a JWT with an exp
claim (or the command line is wrong), {EXIT_CLOSED_PIPE} the reader of the output went away.

--json prints one object with these keys (times in Unix seconds, durations in seconds):
  expired           true once exp has passed
  expires_at        the exp claim
  expires_at_utc    exp in ISO 8601, UTC ("2027-01-15T08:00:00Z"); null beyond year 9999
  expires_at_local  exp in ISO 8601, local time with its offset; null beyond year 9999
  expires_in        seconds left; negative once expired
  refresh_buffer    the --buffer
  refresh_at        when a Scheduler would refresh it: exp - buffer, or now if that passed
  refresh_at_utc, refresh_at_local   the same in ISO 8601
  refresh_in        seconds until then; 0 means now
  claims            every claim's name, sorted
  timing_claims     the values of exp, iat and nbf (when numbers); no other claim's value
                    and never the signature is printed
"""

DEMO_DESCRIPTION = """\
Run a few sessions with short-lived tokens on real timers, one token source
failing for a while, and tell the story as it happens (about 10 seconds).
"""

DEMO_EPILOG = f"""\
with --issuer URL: fetch a token from a real OAuth2 server (client_credentials grant;
its token endpoint found through the issuer's .well-known metadata), then let a
Scheduler keep that session fresh for a few refreshes (about 10 seconds), and exit.
The client credentials come from --client-id/--client-secret or, better for the
secret, from the environment: {CLIENT_ID_VARIABLE}, {CLIENT_SECRET_VARIABLE}.
Without a secret the client sends only its id, as a public client.
"""


def _speed(text: str) -> float:
    speed = float(text)
    if not 0 < speed < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return speed


def _buffer(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, not {text!r}")
    return seconds


def _refreshes(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 100, not {text!r}")
    return int(text)


def _issuer(text: str) -> str:
    try:
        # No password and no query (RFC 8414, 2): either could be a credential on the screen.
        return _checked_url(text, "the issuer", query=False)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    module_run = Path(sys.argv[0]).parts[-2:] == ("token_refresh", "__main__.py")
    parser = argparse.ArgumentParser(
        prog="python -m token_refresh" if module_run else "token-refresh",
        description="Keep session tokens fresh: refresh each one on a timer before it expires.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="watch a few sessions get their tokens refreshed, live (about 10 seconds)",
        description=DEMO_DESCRIPTION,
        epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "-v", "--verbose", action="store_true", help="also show the library's DEBUG log on stderr"
    )
    demo.add_argument("--speed", type=_speed, help=argparse.SUPPRESS)
    demo.add_argument(
        "--issuer",
        type=_issuer,
        metavar="URL",
        help="keep a session fresh against this OAuth2 server (https://; http:// to localhost)",
    )
    demo.add_argument(
        "--client-id",
        metavar="ID",
        help=f"with --issuer (default: ${CLIENT_ID_VARIABLE}, else {DEFAULT_CLIENT_ID!r})",
    )
    demo.add_argument(
        "--client-secret",
        metavar="SECRET",
        help=f"with --issuer; prefer ${CLIENT_SECRET_VARIABLE}: arguments show in ps",
    )
    demo.add_argument(
        "--refreshes",
        type=_refreshes,
        metavar="N",
        help="with --issuer: refresh the session N times, then end it (default: 3)",
    )
    inspect = commands.add_parser(
        "inspect",
        help="tell when a JWT expires and when a Scheduler would refresh it",
        description=INSPECT_DESCRIPTION,
        epilog=INSPECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument(
        "--buffer",
        type=_buffer,
        default=300.0,
        metavar="SECONDS",
        help="the Scheduler's refresh_buffer (default: 300)",
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON object (see below)")
    inspect.add_argument(
        "token",
        nargs="?",
        metavar="TOKEN",
        help="the token; better on standard input, since arguments land in shell history and ps",
    )
    add_token_parser(commands)
    add_agent_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # so that a closed pipe shows here, not at the interpreter's exit
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_CLOSED_PIPE


def _silence_stdout() -> None:
    """Point standard output at os.devnull, so that the flush at exit cannot fail again.

    As the Python documentation's "Note on SIGPIPE" (in the signal module) advises.
    """
    try:
        descriptor = sys.stdout.fileno()
    except (OSError, ValueError):  # not a file (io.UnsupportedOperation): nothing to flush at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, descriptor)
    finally:
        os.close(devnull)


def _run(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args, parser.prog)
        if args.command == "token":
            return run_token(args, parser)
        if args.command == "agent":
            return run_agent(args, parser)
        return _demo(args, parser)
    except BrokenPipeError:
        raise  # an OSError, but no failure of the token server: main() handles it
    except (OSError, InvalidGrant, RateLimited) as error:  # the token server failed us
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def _inspect(args: argparse.Namespace, prog: str) -> int:
    if args.token is not None:
        print(
            f"{prog}: warning: a token given as an argument lands in shell history and ps; "
            "pipe it on standard input instead",
            file=sys.stderr,
        )
        text = args.token
    else:
        if sys.stdin.isatty():
            print(f"{prog}: paste the token, then press Ctrl-D", file=sys.stderr)
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError:
            text = "\N{REPLACEMENT CHARACTER}"  # not a JWT, which is ASCII
    token = text.strip()
    if not token:
        print(f"{prog}: error: no token on standard input", file=sys.stderr)
        return 2
    try:
        report = inspect_token(token, now=time.time(), refresh_buffer=args.buffer)
    except NotAJWTError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_json(), indent=2) if args.json else report.as_text())
    return 1 if report.expired else 0


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.issuer is None:
        given = [
            option
            for option, value in (
                ("--client-id", args.client_id),
                ("--client-secret", args.client_secret),
                ("--refreshes", args.refreshes),
            )
            if value is not None
        ]
        if given:
            parser.error(f"{', '.join(given)} need --issuer")
    elif args.speed is not None:
        parser.error("--speed is for the built-in demo, not --issuer")
    if args.client_secret is not None:
        print(
            f"{parser.prog}: warning: a secret given as an argument shows in ps and shell "
            f"history; set {CLIENT_SECRET_VARIABLE} instead",
            file=sys.stderr,
        )

    logger = logging.getLogger("token_refresh")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)-5s %(name)s: %(message)s"))
    previous_level = logger.level
    if args.verbose:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        if args.issuer is None:
            return run_demo(sys.stdout, speed=args.speed or 1.0)
        return run_issuer_demo(
            sys.stdout,
            args.issuer,
            client_id=args.client_id or os.environ.get(CLIENT_ID_VARIABLE) or DEFAULT_CLIENT_ID,
            client_secret=args.client_secret or os.environ.get(CLIENT_SECRET_VARIABLE),
            refreshes=args.refreshes or 3,
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
