"""The texts relayd serves on its reserved paths: `/` (the browser page) and `/help`.

The page is relayd/static/index.html, one self-contained document: inline CSS and JS, no
request to any other origin (its Content-Security-Policy says so, and tests/test_browser.py
checks it in Chromium). It builds every URL and curl command from `location.origin`, so it
works behind any host name, port or proxy; only the usage text at its foot uses the request's
Host. Its @@NAME@@ placeholders are filled here.
"""
from __future__ import annotations

import functools
import html
from importlib import resources

from relayd import __version__
from relayd.http import RESERVED_PATHS

# Only this origin: inline code, and fetch/XHR to the relay itself (downloads are blob: links).
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "connect-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'")


def help_text(host: bytes) -> bytes:
    h = host.decode("latin-1")
    return f"""relayd {__version__}: one HTTP sender, up to 256 receivers, identical bytes.

Send (the sender waits until n receivers are connected):
  seq 1000000 | curl -T - http://{h}/mypath?n=3
  curl -T ./file.bin http://{h}/mypath?n=3
  curl --data-binary @file -H 'Content-Type: application/json' http://{h}/mypath

Receive (each of the n receivers gets every byte):
  curl http://{h}/mypath?n=3 > out
  curl -OJ http://{h}/mypath        (saves under the sender's Content-Disposition filename)

Rules:
  n: 1..256 (default 1); sender and receivers of a path must agree on n.
  Either side may come first. The path is free again when the transfer ends.
  A second sender, a receiver beyond n, or a receiver of a streaming path: 409.
  A transfer that does not complete ends every receiver's body short (curl exits 18).
  Content-Type, Content-Disposition and X-Piping* headers reach the receivers.

In a browser: http://{h}/ sends text or a file and receives (with progress and sha256).

Reserved paths: / /help /version /health /metrics
""".encode()


@functools.cache
def _page() -> str:
    return resources.files("relayd").joinpath("static/index.html").read_text("utf-8")


def index_page(host: bytes) -> bytes:
    usage = html.escape(help_text(host).decode("latin-1"))
    return (_page().replace("@@CSP@@", CSP)
                 .replace("@@VERSION@@", html.escape(__version__))
                 .replace("@@RESERVED@@", " ".join(p.decode() for p in sorted(RESERVED_PATHS)))
                 .replace("@@USAGE@@", usage)).encode()
