"""``token-refresh token``: print a current access token, fetched once for the whole host."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from typing import cast

from token_refresh.oauth import _checked_url
from token_refresh.shared import FileStore, InvalidGrant, RateLimited, SharedToken

from ._grant import (
    CLIENT_AUTH,
    EXIT_UNREACHABLE,
    ClientAuthName,
    Fetcher,
    GrantOptions,
    exit_status,
    expiry,
    read_secret,
    whole_seconds,
)

CLIENT_ID_VARIABLE = "TOKEN_REFRESH_CLIENT_ID"
CLIENT_SECRET_VARIABLE = "TOKEN_REFRESH_CLIENT_SECRET"
#: --min-ttl's default: a printed token has at least this many seconds left.
MIN_TTL = 60.0

TOKEN_DESCRIPTION = """\
Print a current access token for --key (client_credentials grant). Every process
on the host that uses the same --store shares it: the token is fetched once per
lifetime, however many shells, cron jobs or workers ask at once, and reused while
it has more than --min-ttl seconds left.
"""

TOKEN_EPILOG = f"""\
The client secret comes from ${CLIENT_SECRET_VARIABLE} or --client-secret-file
(the file wins); without one the client sends only its id, as a public client.
--client-id defaults to ${CLIENT_ID_VARIABLE}.

--format token   the token alone (the default)
--format header  Authorization: Bearer <token>   (curl -H @- reads it from stdin)
--format json    {{"Version": 1, "access_token": ..., "expires_at": <Unix seconds>,
                  "Expiration": "<ISO 8601, UTC>"}}, as AWS credential_process readers
                 expect; expires_at is null and Expiration absent when the server tells
                 no lifetime and the token is no JWT

exit status: 0 a token was printed; 1 the token server refused (an OAuth error
answer: invalid_client, invalid_grant, invalid_scope, ...); 2 the command line is
wrong; {EXIT_UNREACHABLE} no usable answer from the token server (unreachable, timed out, a
5xx, a 429 to wait for) or the store failed. Error messages never hold the secret or
a token.
"""


def _url(what: str, query: bool) -> argparse._ActionType:
    def checked(text: str) -> str:
        try:
            # No password, nor (for an issuer) a query: either could be a credential on the screen.
            return _checked_url(text, what, query=query)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return checked


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, not {text!r}")
    return seconds


def add_token_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``token`` command's options."""
    token = commands.add_parser(
        "token",
        help="print a current access token, fetched once for every process sharing the store",
        description=TOKEN_DESCRIPTION,
        epilog=TOKEN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    token.add_argument("--store", required=True, metavar="DIR", help="the FileStore directory")
    token.add_argument("--key", required=True, metavar="K", help="which token in the store")
    where = token.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--issuer", type=_url("the issuer", False), metavar="URL", help="found via .well-known"
    )
    where.add_argument(
        "--token-endpoint",
        type=_url("the token endpoint", True),
        metavar="URL",
        help="the token endpoint itself (no discovery)",
    )
    token.add_argument("--client-id", metavar="ID", help=f"default: ${CLIENT_ID_VARIABLE}")
    token.add_argument("--client-secret-file", metavar="FILE", help="a file holding the secret")
    token.add_argument("--scope", metavar="SCOPE", help="space-separated scopes to ask for")
    token.add_argument("--audience", metavar="AUDIENCE", help="the audience parameter to send")
    token.add_argument("--client-auth", choices=CLIENT_AUTH, default="basic", help="default: basic")
    token.add_argument(
        "--min-ttl",
        type=_seconds,
        default=MIN_TTL,
        metavar="SECONDS",
        help=f"reuse a token while it has more than this left (default: {MIN_TTL:g})",
    )
    token.add_argument(
        "--format",
        choices=("token", "header", "json"),
        default="token",
        help="what to print (default: token; see below)",
    )


def _options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> GrantOptions:
    """The grant the command line asks for; a usage error (exit 2) if it cannot be made."""
    client_id = args.client_id or os.environ.get(CLIENT_ID_VARIABLE)
    if not client_id:
        parser.error(f"token needs --client-id (or ${CLIENT_ID_VARIABLE})")
    secret = os.environ.get(CLIENT_SECRET_VARIABLE) or None
    if args.client_secret_file is not None:
        try:
            secret = read_secret(args.client_secret_file)
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            parser.error(f"--client-secret-file {args.client_secret_file}: {reason}")
    if args.client_auth == "none" and secret is not None:
        parser.error("--client-auth none sends no secret: unset the secret, or pick another")
    return GrantOptions(
        client_id,
        issuer=args.issuer,
        token_endpoint=args.token_endpoint,
        client_secret=secret,
        scope=args.scope,
        audience=args.audience,
        client_auth=cast(ClientAuthName, args.client_auth),
    )


def run_token(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Print the key's token in the chosen format; return the exit status."""
    fetcher = Fetcher(_options(args, parser))
    try:
        store = FileStore(args.store)
        # max_age=None: a token is reused for its lifetime only, never because it is young,
        # so a printed token always has more than --min-ttl left.
        shared = SharedToken(fetcher, store, key=args.key, min_ttl=args.min_ttl, max_age=None)
        token = shared()
        assert token is not None  # a Fetcher returns a Grant or raises
        expires_at = expiry(token, fetcher, store, args.key)
    except (OSError, InvalidGrant, RateLimited) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return exit_status(error)
    print(render(args.format, token, expires_at))
    return 0


def render(output: str, token: str, expires_at: float | None) -> str:
    """The token as ``output`` says: the token, a header line, or credential_process JSON."""
    if output == "token":
        return token
    if output == "header":
        return f"Authorization: Bearer {token}"
    document: dict[str, object] = {"Version": 1, "access_token": token, "expires_at": None}
    if expires_at is not None:
        moment = datetime.fromtimestamp(whole_seconds(expires_at), UTC)
        document["expires_at"] = whole_seconds(expires_at)
        document["Expiration"] = moment.isoformat().replace("+00:00", "Z")
    return json.dumps(document)
