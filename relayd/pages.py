"""The texts relayd serves on its reserved paths: `/` (a plain page) and `/help`."""
from __future__ import annotations

import html

from relayd import __version__


def help_text(host: bytes) -> bytes:
    h = host.decode("latin-1")
    return f"""relayd {__version__}: one HTTP sender, up to 256 receivers, identical bytes.

Send (the sender waits until n receivers are connected):
  seq 1000000 | curl -T - http://{h}/mypath?n=3
  curl -T ./file.bin http://{h}/mypath?n=3
  curl --data-binary @file -H 'Content-Type: application/json' http://{h}/mypath

Receive (each of the n receivers gets every byte):
  curl http://{h}/mypath?n=3 > out

Rules:
  n: 1..256 (default 1); sender and receivers of a path must agree on n.
  Either side may come first. The path is free again when the transfer ends.
  A second sender, a receiver beyond n, or a receiver of a streaming path: 409.
  A transfer that does not complete ends every receiver's body short (curl exits 18).
  Content-Type, Content-Disposition and X-Piping* headers reach the receivers.

Reserved paths: / /help /version /health
""".encode()


def index_page(host: bytes) -> bytes:
    usage = html.escape(help_text(host).decode("latin-1"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>relayd</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto;padding:0 1rem}}
pre{{background:#f4f4f4;padding:1rem;overflow-x:auto}}</style></head>
<body><h1>relayd</h1>
<p>An HTTP pipe: one sender streams once, up to 256 receivers get the identical bytes.</p>
<pre>{usage}</pre></body></html>
""".encode()
