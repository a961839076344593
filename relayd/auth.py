"""Access control: signed URLs, bearer tokens, refusal counting; `relayd sign`.

Off unless `--secret-file PATH` is given. Then every pipe request (GET receives, PUT/POST
sends) needs a credential; `/`, `/help`, `/version` and `/health` stay open and `/metrics`
needs a bearer token with the `metrics` role (`Authorizer.metrics_allowed`).

The secret file is TOML, mode 0600 (a file readable or writable by group or others is
refused), re-read by every worker, so SIGHUP (which replaces the workers) rotates it:

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

Answers, in the order they are decided:
- 429 + Retry-After: this address has had FAILURE_LIMIT refusals within FAILURE_WINDOW_S;
  nothing else is checked, so a blocked address cannot keep guessing.
- 401 + `WWW-Authenticate: Bearer realm="relayd"`: no credential, an unknown token, or a
  signature that does not verify for this exact request: a changed path, n or exp, an unknown
  key id and a forged signature all look alike; also an expired (genuine) URL.
- 403: a genuine credential used for what it does not grant: a receive URL used to send (or
  the reverse), a token outside its prefixes or without the role.
A refusal says nothing about the pipe (whether it exists, who waits); each is logged once to
stderr: `relayd: refused status=403 method=GET path='/llm' peer='10.0.0.7' reason='…'` (the
path without its query; a token is named by its `name`; never a key, signature or token).
`check` also blanks the `sig` parameter in `conn.url`, which later log lines quote.

Refusal counting: a table in anonymous shared memory, made by the first `from_file` call.
The supervisor makes that call before it forks, so every worker (and every worker a SIGHUP
starts) inherits the same table and the limit holds per address across workers. Updates are
unlocked read-modify-writes of 8-byte words: two workers racing on one address may lose one
count, which a rate limit can afford.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import ipaddress
import mmap
import os
import re
import stat
import sys
import time
import urllib.parse
from dataclasses import dataclass

import tomllib

from relayd import logs
from relayd.config import MAX_RECEIVERS
from relayd.protocol import RESERVED_PATHS, HttpError

ROLES = ("send", "recv", "metrics")
KEY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
MIN_KEY_BYTES = 16
MIN_TOKEN_CHARS = 16
FAILURE_LIMIT = 20                       # refusals per address per window, then 429
FAILURE_WINDOW_S = 60
MAX_TTL_S = 366 * 86400
WWW_AUTHENTICATE = b'WWW-Authenticate: Bearer realm="relayd"\r\n'
LOG_PATH_CHARS = 200
SIG_PARAM_RE = re.compile(rb"(^|[?&])sig=[^&#]*")


# -- the secret file ---------------------------------------------------------------------------
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


# -- refusal counting --------------------------------------------------------------------------
class FailureTable:
    """Refusals per client address in shared memory: slot = [address hash | start<<32 | count].

    Open addressing over PROBES slots; a stale or free slot is reused, and when all are live
    the one whose window started first is evicted (that address merely gets a fresh count).
    """

    SLOTS = 4096
    PROBES = 8

    def __init__(self):
        self.mem = mmap.mmap(-1, self.SLOTS * 16)      # MAP_SHARED|MAP_ANONYMOUS: fork keeps it
        self.words = memoryview(self.mem).cast("Q")    # aligned 8-byte loads and stores
        # Keyed hash: a client cannot pick addresses that crowd out another's slot.
        self.salt = os.urandom(16)

    def _hash(self, address: str) -> int:
        h = int.from_bytes(hashlib.blake2b(address.encode(), key=self.salt,
                                           digest_size=8).digest(), "little")
        return h or 1                    # 0 marks a free slot

    def _find(self, h: int) -> int | None:
        start = h % self.SLOTS
        for i in range(self.PROBES):
            slot = (start + i) % self.SLOTS
            if self.words[2 * slot] == h:
                return slot
        return None

    def retry_after(self, address: str, now: int) -> int:
        """Seconds this address must wait; 0 = not blocked."""
        slot = self._find(self._hash(address))
        if slot is None:
            return 0
        v = self.words[2 * slot + 1]
        started, count = v >> 32, v & 0xFFFFFFFF
        left = started + FAILURE_WINDOW_S - now
        return max(1, left) if count >= FAILURE_LIMIT and left > 0 else 0

    def record(self, address: str, now: int) -> None:
        h = self._hash(address)
        slot = self._find(h)
        if slot is None:
            start = h % self.SLOTS
            candidates = [(start + i) % self.SLOTS for i in range(self.PROBES)]
            slot = min(candidates, key=lambda s: (self.words[2 * s] != 0
                                                  and (self.words[2 * s + 1] >> 32)
                                                  + FAILURE_WINDOW_S > now,
                                                  self.words[2 * s + 1] >> 32))
            self.words[2 * slot + 1] = 0
            self.words[2 * slot] = h
        v = self.words[2 * slot + 1]
        started, count = v >> 32, v & 0xFFFFFFFF
        if count == 0 or now - started >= FAILURE_WINDOW_S:
            started, count = now, 0
        self.words[2 * slot + 1] = (started << 32) | min(count + 1, 0xFFFFFFFF)


_failures: FailureTable | None = None    # made in the supervisor, inherited by the workers


def _now_s() -> int:
    return int(time.monotonic())         # CLOCK_MONOTONIC is system-wide: same in every worker


# -- the authorizer ----------------------------------------------------------------------------
class Authorizer:
    """Decides every pipe request of one worker; `check` raises HttpError to refuse."""

    def __init__(self, secrets: Secrets, failures: FailureTable):
        self.secrets = secrets
        self.failures = failures

    @classmethod
    def from_file(cls, path: str) -> "Authorizer":
        global _failures
        secrets = load_secrets(path)
        if _failures is None:
            _failures = FailureTable()
        return cls(secrets, _failures)

    # -- pipes -------------------------------------------------------------------------------
    def check(self, conn, role_method: bytes, query: bytes | None) -> None:
        """None to allow this pipe request; raises HttpError(401/403/429) to refuse."""
        role = "recv" if role_method == b"GET" else "send"
        # The URL is logged after routing (rejections, --access-log); a live signature in a
        # log is a usable credential, so only a placeholder remains there.
        conn.url = SIG_PARAM_RE.sub(rb"\1sig=-", conn.url)
        address = self.client_address(conn)
        now = _now_s()
        wait = self.failures.retry_after(address, now)
        if wait:
            self.refuse(address, conn, 429, "too many refused requests; retry later",
                        b"Retry-After: %d\r\n" % wait, count=False)
        status, reason, who = self.decide(conn, role, query)
        if status:
            self.refuse(address, conn, status, reason,
                        WWW_AUTHENTICATE if status == 401 else b"", who=who)

    def decide(self, conn, role: str, query: bytes | None) -> tuple[int, str, str]:
        """(0, "", "") to allow, else (status, reason, credential name for the log)."""
        auth = [v for k, v in conn.headers if k == b"authorization"]
        if auth:
            token = self.bearer_token(auth)
            if token is None:
                return 401, "a valid signature or token is needed", ""
            who = f"token {token.name}" if token.name else "a token"
            if role not in token.roles:
                return 403, f"this token may not {'receive' if role == 'recv' else 'send'}", who
            if not any(conn.path.startswith(p) for p in token.prefixes):
                return 403, "this token is not valid for this path", who
            return 0, "", who
        fields = self.signed_fields(query)
        if fields is None:
            return 401, "a valid signature or token is needed", ""
        exp, kid, sig = fields
        key = self.secrets.keys.get(kid)
        if key is None:
            return 401, "a valid signature or token is needed", ""
        expired = time.time() >= exp
        other = "send" if role == "recv" else "recv"
        if hmac.compare_digest(signature(key, role, conn.path, conn.n, exp, kid), sig):
            if expired:
                return 401, "this signed URL has expired", f"key {kid}"
            return 0, "", f"key {kid}"
        if hmac.compare_digest(signature(key, other, conn.path, conn.n, exp, kid), sig):
            if expired:
                return 401, "this signed URL has expired", f"key {kid}"
            return 403, ("this signed URL is for sending; it cannot receive" if other == "send"
                         else "this signed URL is for receiving; it cannot send"), f"key {kid}"
        return 401, "a valid signature or token is needed", ""

    @staticmethod
    def signed_fields(query: bytes | None) -> tuple[int, str, bytes] | None:
        """(exp, kid, sig) when each is given exactly once and well-formed, else None."""
        if not query:
            return None
        found: dict[str, list[str]] = {"exp": [], "kid": [], "sig": []}
        for k, v in urllib.parse.parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if k in found:
                found[k].append(v)
        if any(len(v) != 1 for v in found.values()):
            return None
        exp, kid, sig = found["exp"][0], found["kid"][0], found["sig"][0]
        if not (exp.isascii() and exp.isdigit() and len(exp) <= 12):
            return None
        return int(exp), kid, sig.encode("latin-1")

    def bearer_token(self, values: list[bytes]) -> Token | None:
        """The configured token these Authorization values carry, or None."""
        if len(values) != 1:
            return None
        scheme, _, credential = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer" or not credential.strip():
            return None
        digest = hashlib.sha256(credential.strip()).digest()
        match = None
        for token in self.secrets.tokens:             # no early exit: same time for every token
            if hmac.compare_digest(token.digest, digest):
                match = token
        return match

    # -- /metrics ----------------------------------------------------------------------------
    def metrics_allowed(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """True when the request carries a bearer token with the `metrics` role."""
        token = self.bearer_token([v for k, v in headers if k == b"authorization"])
        return token is not None and "metrics" in token.roles

    def check_metrics(self, conn) -> None:
        """`check` for /metrics: counted, logged, 429/401/403 like a pipe request."""
        address = self.client_address(conn)
        wait = self.failures.retry_after(address, _now_s())
        if wait:
            self.refuse(address, conn, 429, "too many refused requests; retry later",
                        b"Retry-After: %d\r\n" % wait, count=False)
        token = self.bearer_token([v for k, v in conn.headers if k == b"authorization"])
        if token is None:
            self.refuse(address, conn, 401, "a token with the metrics role is needed",
                        WWW_AUTHENTICATE)
        if "metrics" not in token.roles:
            self.refuse(address, conn, 403, "this token may not read metrics",
                        who=f"token {token.name}" if token.name else "a token")

    # -- refusals ----------------------------------------------------------------------------
    def client_address(self, conn) -> str:
        try:
            peer = conn.sock.getpeername()[0]
        except (OSError, IndexError, TypeError):
            return "unknown"
        if peer in self.secrets.trusted_proxies:
            forwarded = [v for k, v in conn.headers if k == b"x-forwarded-for"]
            if forwarded:
                # The last entry is the one the proxy added; earlier ones are the client's say.
                last = forwarded[-1].split(b",")[-1].strip().decode("latin-1")
                try:
                    return str(ipaddress.ip_address(last))
                except ValueError:
                    pass
        return peer

    def refuse(self, address: str, conn, status: int, reason: str, headers: bytes = b"",
               who: str = "", count: bool = True) -> None:
        if count:
            self.failures.record(address, _now_s())
        path = conn.path[:LOG_PATH_CHARS].decode("ascii", "backslashreplace")
        logs.event("refused", status=status, method=conn.parser.get_method(), path=path,
                   peer=address, reason=reason + (f" ({who})" if who else ""))
        raise HttpError(status, reason, headers)


# -- relayd sign -------------------------------------------------------------------------------
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
