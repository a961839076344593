"""`relayd sign`: print a signed send or receive URL from the secret file's keys."""
from __future__ import annotations

import argparse
import sys
import time
import urllib.parse

from relayd.config import MAX_RECEIVERS
from relayd.http import RESERVED_PATHS
from relayd.secretfile import Secrets, load_secrets, signature

MAX_TTL_S = 366 * 86400


def ttl_seconds(text: str) -> int:
    """'10m', '3600s', '2h', '1d', '90' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "s")
    if not number.isdigit() or not 0 < int(number) * units[unit] <= MAX_TTL_S:
        raise argparse.ArgumentTypeError(f"not a TTL: {text!r} (e.g. 10m, 3600s, 2h, 1d; "
                                         f"at most {MAX_TTL_S // 86400}d)")
    return int(number) * units[unit]


def split_target(target: str) -> tuple[bytes, int]:
    """'/llm?n=50' -> (b'/llm', 50); ValueError for what relayd would not serve as a pipe."""
    path, _, query = target.partition("?")
    if not path.startswith("/") or not path.isascii() or any(
            c.isspace() or c == "#" or not c.isprintable() for c in path):
        raise ValueError(f"{target!r}: give the path as sent on the wire, e.g. /llm?n=50")
    if path.encode() in RESERVED_PATHS:
        raise ValueError(f"{path} is a reserved path, not a pipe")
    params = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(k != "n" for k, _ in params) or len(params) > 1:
        raise ValueError(f"{target!r}: the only query parameter to give is n (once)")
    n = params[0][1] if params else "1"
    if not (n.isascii() and n.isdigit() and 1 <= int(n) <= MAX_RECEIVERS):
        raise ValueError(f"n must be an integer from 1 to {MAX_RECEIVERS}, got {n!r}")
    return path.encode(), int(n)


def sign_url(secrets: Secrets, role: str, target: str, ttl_s: int, kid: str | None = None,
             base: str = "", now: float | None = None) -> str:
    """A signed path+query (or full URL with base) for role 'send' or 'recv'."""
    if not secrets.keys:
        raise ValueError("the secret file has no [keys] to sign with")
    kid = kid or next(iter(secrets.keys))
    if kid not in secrets.keys:
        raise ValueError(f"no key {kid!r} in the secret file (it has {', '.join(secrets.keys)})")
    path, n = split_target(target)
    exp = int(now if now is not None else time.time()) + ttl_s
    sig = signature(secrets.keys[kid], role, path, n, exp, kid).decode()
    return f"{base.rstrip('/')}{path.decode()}?n={n}&exp={exp}&kid={kid}&sig={sig}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="relayd sign",
        description="Print a signed URL: a send URL can only send, a receive URL only receive, "
                    "n cannot be changed, and it stops working after --ttl.")
    role = p.add_mutually_exclusive_group(required=True)
    role.add_argument("--send", metavar="PATH", help="sign for sending, e.g. '/llm?n=50'")
    role.add_argument("--recv", metavar="PATH", help="sign for receiving, e.g. '/llm?n=50'")
    p.add_argument("--ttl", type=ttl_seconds, default=ttl_seconds("10m"),
                   help="lifetime: 3600s, 10m, 2h, 1d (default 10m)")
    p.add_argument("--secret-file", required=True, help="the file relayd --secret-file reads")
    p.add_argument("--key-id", help="key to sign with (default: the first in [keys])")
    p.add_argument("--base", default="",
                   help="prefix for a full URL, e.g. https://relay.example:443 "
                        "(default: print path and query)")
    args = p.parse_args(argv)
    try:
        secrets = load_secrets(args.secret_file)
    except OSError as e:
        print(f"relayd sign: {args.secret_file}: {e.strerror}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"relayd sign: {args.secret_file}: {e}", file=sys.stderr)
        return 1
    try:
        url = sign_url(secrets, "send" if args.send else "recv", args.send or args.recv,
                       args.ttl, args.key_id, args.base)
    except ValueError as e:
        print(f"relayd sign: {e}", file=sys.stderr)
        return 1
    print(url)
    return 0
