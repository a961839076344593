"""Routing: a parsed request head -> a reply to write, or a pipe request for the rendezvous.

`route` is a function of the request and the `Site` (what the reserved paths show): no socket,
no connection state. Client mistakes raise `HttpError`; the connection answers them.

httptools facts it relies on (DESIGN §3): llhttp validates Content-Length and chunk framing
but not Host, Transfer-Encoding values or Expect, accepts HTTP/0.9-style and textual 2.0
request lines, and reports CONNECT/upgrade as such -- so those are decided here, before a
sender is paired or answered.
"""
from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple, Protocol

import httptools

from relayd import __version__, pages
from relayd.control import SenderInfo
from relayd.http import (PIPE_METHODS_ALLOW, RESERVED_PATHS, TEXT, HttpError, parse_n,
                         parse_slow)

# Headers a sender may pass on to its receivers (besides Content-Type and Content-Length).
FORWARDED_HEADERS = (b"content-disposition",)
ROUTED_HEADERS = frozenset((b"host", b"transfer-encoding", b"content-length", b"expect",
                            b"upgrade"))
CORS_PIPE = (b"Access-Control-Allow-Methods: GET, PUT, POST, OPTIONS\r\n"
             # Authorization: a page sending a bearer token (--secret-file) cross-origin.
             b"Access-Control-Allow-Headers: Content-Type, Content-Disposition, X-Piping, "
             b"Authorization\r\n"
             b"Access-Control-Max-Age: 86400\r\n")
CORS_RESERVED = b"Access-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n"
RESERVED_ALLOW = b"Allow: GET, HEAD, OPTIONS\r\n"


@dataclasses.dataclass
class Request:
    """A request head as the connection parsed it."""
    method: bytes
    url: bytes                        # the raw request target
    version: str                      # "1.0" | "1.1" (anything else is refused here)
    headers: list                     # [(lowercased name, value)]
    keep_alive: bool
    peer: str = ""                    # the client's address

    def values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    def routed(self) -> dict[bytes, list[bytes]]:
        """The values of the headers routing decides on, by name, in one pass."""
        found: dict[bytes, list[bytes]] = {}
        for k, v in self.headers:
            if k in ROUTED_HEADERS:
                found.setdefault(k, []).append(v)
        return found


class Reply(NamedTuple):
    status: int
    body: bytes
    content_type: bytes = TEXT
    extra: bytes = b""
    head_only: bool = False           # HEAD: the headers of the GET, no body
    keep_alive: bool = False


class PipeRequest(NamedTuple):
    role: str                         # "sender" | "receiver"
    path: bytes                       # raw bytes: `//a` and `/a` are different pipes
    n: int
    slow: str | None                  # a sender's ?slow=block|drop
    info: SenderInfo | None           # a sender's headers for its receivers
    chunked: bool
    content_length: int | None
    expect_continue: bool


class Site(Protocol):
    """What the reserved paths show, and who decides access."""
    authorizer: object | None

    def health(self) -> tuple[bool, bytes]:
        """(ok, JSON document); not ok answers 503 (draining)."""

    def metrics(self) -> bytes:
        """Prometheus text."""


def route(request: Request, site: Site) -> Reply | PipeRequest:
    method = request.method
    if request.version not in ("1.0", "1.1"):
        raise HttpError(505, f"HTTP/{request.version} is not supported; use HTTP/1.1")
    if method == b"CONNECT":
        raise HttpError(405, "CONNECT is not supported", PIPE_METHODS_ALLOW)
    headers = request.routed()
    hosts = headers.get(b"host", ())
    if len(hosts) > 1 or (request.version == "1.1" and not hosts):
        raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header")
    te = [v.strip().lower() for v in headers.get(b"transfer-encoding", ())]
    if te and request.version == "1.0":
        # RFC 9112 §6.1: framing a 1.0 message this way is faulty (a smuggling risk).
        raise HttpError(400, "Transfer-Encoding is not HTTP/1.0; use Content-Length or 1.1")
    if te and te != [b"chunked"]:
        raise HttpError(501, "only Transfer-Encoding: chunked is supported")
    cl = headers.get(b"content-length")
    expect = [v.strip().lower() for v in headers.get(b"expect", ())]
    if expect and expect != [b"100-continue"]:
        raise HttpError(417, "only Expect: 100-continue is supported")
    try:
        parsed = httptools.parse_url(request.url)
    except httptools.HttpParserInvalidURLError:
        raise HttpError(400, "the request target is not a valid URL") from None
    path = parsed.path or b"/"
    if not path.startswith(b"/"):
        raise HttpError(400, "the request target must be an absolute path")
    # A reply leaves a body unread, or an upgrade offer the parser cannot step past: the
    # connection is not reused after it.
    keep = (request.keep_alive and not te and b"upgrade" not in headers
            and not (cl and cl[0].strip() != b"0"))
    if path in RESERVED_PATHS:
        return reserved(request, path, hosts[0] if hosts else b"localhost:8080", site, keep)
    if method == b"OPTIONS":
        return Reply(200, b"", extra=CORS_PIPE, keep_alive=keep)
    if method not in (b"GET", b"PUT", b"POST"):
        raise HttpError(405, f"{method.decode('latin-1')} is not a pipe method: GET receives, "
                             "PUT or POST sends", PIPE_METHODS_ALLOW)
    n = parse_n(parsed.query)
    role = "receiver" if method == b"GET" else "sender"
    if site.authorizer is not None:
        decision = site.authorizer.decide_pipe(request, "recv" if role == "receiver" else "send",
                                               path, n, parsed.query)
        if not decision.allowed:
            raise HttpError(decision.status, decision.reason, decision.headers)
    if role == "receiver":
        return PipeRequest("receiver", path, n, None, None, False, None, False)
    if b"upgrade" in headers:
        raise HttpError(400, "a sender cannot ask for a protocol upgrade")
    chunked = bool(te)
    length = None if chunked else (int(cl[0]) if cl else 0)      # llhttp validated it
    return PipeRequest("sender", path, n, parse_slow(parsed.query), sender_info(request, length),
                       chunked, None if chunked else length,
                       bool(expect) and request.version == "1.1")   # no 1xx to 1.0 (§15.2)


def sender_info(request: Request, length: int | None) -> SenderInfo:
    """What the receivers' response carries from this sender's request."""
    content_type = b"application/octet-stream"
    forwarded = []
    for k, v in request.headers:
        if k == b"content-type":
            content_type = v
        elif k in FORWARDED_HEADERS or k.startswith(b"x-piping"):
            forwarded.append((k, v))
    # A sender's page must not run in the relay's origin.
    media = content_type.split(b";")[0]
    if media.strip().lower() in (b"text/html", b"application/xhtml+xml"):
        content_type = b"text/plain" + content_type[len(media):]
    return SenderInfo(content_type, forwarded, length)


def reserved(request: Request, path: bytes, host: bytes, site: Site, keep: bool) -> Reply:
    method = request.method
    if method in (b"PUT", b"POST"):
        raise HttpError(405, f"{path.decode()} is a reserved path; choose another path to "
                             "send to", RESERVED_ALLOW)
    if method == b"OPTIONS":
        return Reply(200, b"", extra=CORS_RESERVED, keep_alive=keep)
    if method not in (b"GET", b"HEAD"):
        raise HttpError(405, f"{path.decode()} answers GET and HEAD only", RESERVED_ALLOW)
    head = method == b"HEAD"
    if path == b"/":
        return Reply(200, pages.index_page(host), b"text/html; charset=utf-8",
                     head_only=head, keep_alive=keep)
    if path == b"/help":
        return Reply(200, pages.help_text(host), head_only=head, keep_alive=keep)
    if path == b"/version":
        return Reply(200, f"relayd {__version__}\n".encode(), head_only=head, keep_alive=keep)
    if path == b"/health":
        ok, body = site.health()
        # 503 while draining: a balancer's health check moves new pipes elsewhere.
        return Reply(200 if ok else 503, body, b"application/json", head_only=head,
                     keep_alive=keep)
    if path == b"/favicon.ico":
        return Reply(204, b"", head_only=head, keep_alive=keep)
    if path == b"/robots.txt":
        return Reply(200, b"User-agent: *\nDisallow: /\n", head_only=head, keep_alive=keep)
    # /metrics: with access control on, only a token with the metrics role reads it.
    if site.authorizer is not None:
        decision = site.authorizer.decide_metrics(request)
        if not decision.allowed:
            raise HttpError(decision.status, decision.reason, decision.headers)
    from relayd.metrics import CONTENT_TYPE
    return Reply(200, site.metrics(), CONTENT_TYPE, head_only=head, keep_alive=keep)


def health_json(document: dict) -> bytes:
    return json.dumps(document, indent=1).encode() + b"\n"
