"""Access control: decides each pipe request (and /metrics) from the secret file's keys and
tokens (secretfile.py), counting refusals per client address (refusals.py).

Off unless `--secret-file PATH` is given. Then every pipe request (GET receives, PUT/POST
sends) needs a credential; `/`, `/help`, `/version` and `/health` stay open and `/metrics`
needs a bearer token with the `metrics` role.

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
The authorizer returns a `Decision`; it never touches the connection.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import time
import urllib.parse
from typing import NamedTuple

from relayd import logs, refusals
from relayd.refusals import FailureTable
from relayd.secretfile import Secrets, Token, load_secrets, signature

WWW_AUTHENTICATE = b'WWW-Authenticate: Bearer realm="relayd"\r\n'
LOG_PATH_CHARS = 200
SIG_PARAM_RE = re.compile(rb"(^|[?&])sig=[^&#]*")


class Decision(NamedTuple):
    allowed: bool
    status: int = 0
    reason: str = ""
    headers: bytes = b""


ALLOW = Decision(True)


def redact(url: bytes) -> bytes:
    """The URL as logs may quote it: a live signature in a log is a usable credential."""
    return SIG_PARAM_RE.sub(rb"\1sig=-", url) if b"sig=" in url else url


class Authorizer:
    """Decides every pipe request of one worker, and who reads /metrics."""

    def __init__(self, secrets: Secrets, failures: FailureTable):
        self.secrets = secrets
        self.failures = failures

    @classmethod
    def from_file(cls, path: str) -> "Authorizer":
        """OSError if unreadable, ValueError if unsafe or malformed."""
        return cls(load_secrets(path), refusals.shared())

    # -- pipes -------------------------------------------------------------------------------
    def decide_pipe(self, request, role: str, path: bytes, n: int,
                    query: bytes | None) -> Decision:
        """role "send" or "recv"; a refusal is counted and logged once."""
        address = self.client_address(request)
        blocked = self._blocked(address)
        if blocked:
            return self._refuse(request, path, address, blocked, count=False)
        status, reason, who = self.judge(request.headers, role, path, n, query)
        if not status:
            return ALLOW
        return self._refuse(request, path, address, Decision(
            False, status, reason, WWW_AUTHENTICATE if status == 401 else b""), who=who)

    def judge(self, headers: list, role: str, path: bytes, n: int,
              query: bytes | None) -> tuple[int, str, str]:
        """(0, "", who) to allow, else (status, reason, credential name for the log)."""
        auth = [v for k, v in headers if k == b"authorization"]
        if auth:
            token = self.bearer_token(auth)
            if token is None:
                return 401, "a valid signature or token is needed", ""
            who = f"token {token.name}" if token.name else "a token"
            if role not in token.roles:
                return 403, f"this token may not {'receive' if role == 'recv' else 'send'}", who
            if not any(path.startswith(p) for p in token.prefixes):
                return 403, "this token is not valid for this path", who
            return 0, "", who
        fields = self.signed_fields(query)
        if fields is None:
            return 401, "a valid signature or token is needed", ""
        exp, kid, sig = fields
        key = self.secrets.keys.get(kid)
        if key is None:
            return 401, "a valid signature or token is needed", ""
        expired = time.time() >= exp             # expiry is wall-clock time: it is in the URL
        other = "send" if role == "recv" else "recv"
        if hmac.compare_digest(signature(key, role, path, n, exp, kid), sig):
            if expired:
                return 401, "this signed URL has expired", f"key {kid}"
            return 0, "", f"key {kid}"
        if hmac.compare_digest(signature(key, other, path, n, exp, kid), sig):
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
        # A character beyond latin-1 cannot be in a real signature: it fails as a forgery.
        return int(exp), kid, sig.encode("latin-1", "replace")

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

    def decide_metrics(self, request) -> Decision:
        """Like a pipe request: counted, logged, 429/401/403."""
        address = self.client_address(request)
        path = b"/metrics"
        blocked = self._blocked(address)
        if blocked:
            return self._refuse(request, path, address, blocked, count=False)
        token = self.bearer_token(request.values(b"authorization"))
        if token is None:
            return self._refuse(request, path, address, Decision(
                False, 401, "a token with the metrics role is needed", WWW_AUTHENTICATE))
        if "metrics" not in token.roles:
            return self._refuse(request, path, address,
                                Decision(False, 403, "this token may not read metrics"),
                                who=f"token {token.name}" if token.name else "a token")
        return ALLOW

    # -- refusals ----------------------------------------------------------------------------
    def client_address(self, request) -> str:
        peer = request.peer or "unknown"
        if peer in self.secrets.trusted_proxies:
            forwarded = request.values(b"x-forwarded-for")
            if forwarded:
                # The last entry is the one the proxy added; earlier ones are the client's say.
                last = forwarded[-1].split(b",")[-1].strip().decode("latin-1")
                try:
                    return str(ipaddress.ip_address(last))
                except ValueError:
                    pass
        return peer

    def _blocked(self, address: str) -> Decision | None:
        wait = self.failures.retry_after(address, refusals.now_s())
        if not wait:
            return None
        return Decision(False, 429, "too many refused requests; retry later",
                        b"Retry-After: %d\r\n" % wait)

    def _refuse(self, request, path: bytes, address: str, decision: Decision,
                who: str = "", count: bool = True) -> Decision:
        if count:
            self.failures.record(address, refusals.now_s())
        shown = path[:LOG_PATH_CHARS].decode("ascii", "backslashreplace")
        logs.event("refused", status=decision.status, method=request.method, path=shown,
                   peer=address, reason=decision.reason + (f" ({who})" if who else ""))
        return decision
