"""The secret file of access control: signing keys, bearer tokens, trusted proxies.

TOML, mode 0600 (a file readable or writable by group or others is refused), re-read by every
worker, so a SIGHUP (a new generation of workers) rotates it:

    # Signing keys: key id -> hex, at least 16 bytes (make one: `openssl rand -hex 32`).
    # `relayd sign` uses the first key unless --key-id says otherwise. To rotate: add the new
    # key first, SIGHUP, sign with it; drop the old key once its URLs have expired, SIGHUP.
    [keys]
    k2 = "5f1c…"
    k1 = "9a0e…"

    # Bearer tokens for long-lived services (`Authorization: Bearer <token>`).
    [[tokens]]
    name = "scorer"                 # optional, shown in refusal logs instead of the token
    token = "…"                     # at least 16 characters (`openssl rand -hex 24`)
    roles = ["send", "recv"]        # any of send, recv, metrics
    prefixes = ["/llm/"]            # path prefixes it may use (raw bytes; end with "/")

    [[tokens]]
    name = "prometheus"
    token = "…"
    roles = ["metrics"]             # no prefixes: no pipe at all

    # Optional, before the tables: peers whose last X-Forwarded-For entry is the client's
    # address for refusal counting (HAProxy in front: deploy/haproxy-tls.cfg).
    trusted_proxies = ["127.0.0.1"]

Signed URL: `/path?n=N&exp=E&kid=K&sig=S`, where E is the expiry in Unix seconds, K a key id
and S = base64url (no padding) of HMAC-SHA256(key[K], "ROLE\\nPATH\\nN\\nE\\nK"), ROLE `send`
or `recv`, PATH the raw request path, N the receiver count (1 when the URL has no n).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import re
import stat
from dataclasses import dataclass

import tomllib

ROLES = ("send", "recv", "metrics")
KEY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
MIN_KEY_BYTES = 16
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Token:
    name: str
    digest: bytes                        # sha256 of the token: equal-length compare_digest
    roles: frozenset
    prefixes: tuple


@dataclass(frozen=True)
class Secrets:
    keys: dict                           # key id -> key bytes, file order
    tokens: tuple
    trusted_proxies: frozenset


def load_secrets(path: str) -> Secrets:
    """The parsed secret file; OSError if unreadable, ValueError if unsafe or malformed."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError("is not a regular file")
        if mode & 0o077:
            raise ValueError(f"is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                             f"chmod 600 it")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = tomllib.load(f)       # TOMLDecodeError is a ValueError
    finally:
        os.close(fd)
    unknown = set(data) - {"keys", "tokens", "trusted_proxies"}
    if unknown:
        raise ValueError(f"unknown entries {sorted(unknown)} (expected [keys], [[tokens]], "
                         "trusted_proxies)")
    keys = {}
    raw_keys = data.get("keys", {})
    if not isinstance(raw_keys, dict):
        raise ValueError("[keys] must be a table: key id = \"hex\"")
    for kid, value in raw_keys.items():
        if not KEY_ID_RE.fullmatch(kid):
            raise ValueError(f"key id {kid!r}: use 1-32 of A-Z a-z 0-9 _ . -")
        try:
            key = bytes.fromhex(value)
        except (TypeError, ValueError):
            raise ValueError(f"key {kid}: not a hex string") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"key {kid}: {len(key)} bytes; use at least {MIN_KEY_BYTES} "
                             "(openssl rand -hex 32)")
        keys[kid] = key
    tokens = []
    raw_tokens = data.get("tokens", [])
    if not isinstance(raw_tokens, list):
        raise ValueError("tokens must be [[tokens]] tables")
    for i, t in enumerate(raw_tokens, 1):
        where = f"token {i}"
        if not isinstance(t, dict):
            raise ValueError(f"{where}: must be a [[tokens]] table")
        extra = set(t) - {"name", "token", "roles", "prefixes"}
        if extra:
            raise ValueError(f"{where}: unknown fields {sorted(extra)}")
        name = t.get("name", "")
        if not isinstance(name, str):
            raise ValueError(f"{where}: name must be a string")
        where = f"token {name or i}"
        secret = t.get("token")
        if not isinstance(secret, str) or len(secret) < MIN_TOKEN_CHARS or not secret.isascii() \
                or any(c.isspace() for c in secret):
            raise ValueError(f"{where}: token must be at least {MIN_TOKEN_CHARS} ASCII characters "
                             "without spaces")
        roles = t.get("roles")
        if not isinstance(roles, list) or not roles or not set(roles) <= set(ROLES):
            raise ValueError(f"{where}: roles must be a non-empty list of {', '.join(ROLES)}")
        prefixes = t.get("prefixes", [])
        if not isinstance(prefixes, list) or not all(
                isinstance(p, str) and p.startswith("/") and p.isascii() for p in prefixes):
            raise ValueError(f"{where}: prefixes must be a list of paths starting with /")
        if {"send", "recv"} & set(roles) and not prefixes:
            raise ValueError(f"{where}: a send or recv role needs prefixes (\"/\" for every path)")
        digest = hashlib.sha256(secret.encode()).digest()
        if any(digest == other.digest for other in tokens):
            raise ValueError(f"{where}: the same token appears twice")
        tokens.append(Token(name, digest, frozenset(roles),
                            tuple(p.encode() for p in prefixes)))
    if not keys and not tokens:
        raise ValueError("holds no [keys] and no [[tokens]]: nothing could ever be allowed")
    proxies = data.get("trusted_proxies", [])
    try:
        trusted = frozenset(str(ipaddress.ip_address(p)) for p in proxies)
    except (TypeError, ValueError):
        raise ValueError("trusted_proxies must be a list of IP addresses") from None
    return Secrets(keys, tuple(tokens), trusted)


def signature(key: bytes, role: str, path: bytes, n: int, exp: int, kid: str) -> bytes:
    """The `sig` parameter (base64url, unpadded) for these fields."""
    message = b"\n".join((role.encode(), path, str(n).encode(), str(exp).encode(), kid.encode()))
    mac = hmac.digest(key, message, "sha256")
    return base64.urlsafe_b64encode(mac).rstrip(b"=")
