"""HTTP/1.x vocabulary shared by the front and the data path: statuses, heads, errors, the
query parameters relayd reads, and the reserved paths."""
from __future__ import annotations

import urllib.parse

from relayd.config import MAX_RECEIVERS

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 429: "Too Many Requests",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
    417: "Expectation Failed", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
COMMON_HEADERS = (b"Access-Control-Allow-Origin: *\r\n"
                  b"X-Content-Type-Options: nosniff\r\n")
# Paths the relay answers itself; never a pipe.
RESERVED_PATHS = frozenset({b"/", b"/help", b"/version", b"/health", b"/metrics",
                            b"/favicon.ico", b"/robots.txt"})
PIPE_METHODS_ALLOW = b"Allow: GET, PUT, POST, OPTIONS\r\n"
TEXT = b"text/plain; charset=utf-8"


class HttpError(Exception):
    """A client's mistake: one response with this status and reason, then close."""

    def __init__(self, status: int, reason: str, headers: bytes = b""):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


def response_head(status: int, headers: bytes = b"", version: str = "1.1") -> bytes:
    return (f"HTTP/{version} {status} {REASONS.get(status, 'Unknown')}\r\n".encode()
            + headers + COMMON_HEADERS + b"\r\n")


def simple_response(status: int, body: bytes, content_type: bytes = TEXT, close: bool = True,
                    extra: bytes = b"", head_only: bool = False) -> bytes:
    """A whole response; `head_only` (HEAD) keeps the headers, Content-Length included, and
    drops the body (RFC 9110 §9.3.2)."""
    # No Content-Length on a 204 (RFC 9110 §8.6); it has no body either.
    length = b"Content-Length: %d\r\n" % len(body) if status != 204 else b""
    headers = (b"Content-Type: " + content_type + b"\r\n" + length + extra
               + (b"Connection: close\r\n" if close else b""))
    return response_head(status, headers) + (b"" if head_only else body)


def error_body(reason: str) -> bytes:
    """Every error body is one human line, so curl shows the reason."""
    return f"[ERROR] {reason}\n".encode()


def parse_n(query: bytes | None) -> int:
    """The receiver count from the query string: strictly digits, 1..256, at most once."""
    if not query:
        return 1
    digits = query[2:]
    if query[:2] == b"n=" and digits.isdigit() and len(digits) <= 3 and \
            1 <= int(digits) <= MAX_RECEIVERS:
        return int(digits)             # the common query, `n=50`, without a parse
    values = [v for k, v in urllib.parse.parse_qsl(query.decode("latin-1"),
                                                     keep_blank_values=True) if k == "n"]
    if not values:
        return 1
    if len(values) > 1:
        raise HttpError(400, "give n once: repeated n parameters are ambiguous")
    v = values[0]
    if not v.isascii() or not v.isdigit() or len(v) > 3 or not 1 <= int(v) <= MAX_RECEIVERS:
        raise HttpError(400, f"n must be an integer from 1 to {MAX_RECEIVERS}, got {v!r}")
    return int(v)


def parse_slow(query: bytes | None) -> str | None:
    """A sender's policy for receivers beyond the spill limit: ?slow=block|drop."""
    if not query or b"slow=" not in query:
        return None
    values = [v for k, v in urllib.parse.parse_qsl(query.decode("latin-1")) if k == "slow"]
    if len(values) != 1 or values[0] not in ("block", "drop"):
        raise HttpError(400, "slow must be given once, as block or drop")
    return values[0]
