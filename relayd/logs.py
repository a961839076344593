"""Log lines on stderr, journald-friendly: one line per event, `text` or `json` (--log-format).

Text: `relayd: transfer path='/llm' n=3 bytes=… outcome=ok` (path quoted, the rest plain, the
outcome last because it may hold spaces). JSON: {"event": "transfer", "ts": …, "path": …}.
No line per chunk anywhere: events are transfers, rejections, lifecycle, and (with
--access-log) requests.
"""
from __future__ import annotations

import json
import sys
import time

_format = "text"


def configure(log_format: str) -> None:
    global _format
    _format = log_format


def message(text: str) -> None:
    """A lifecycle sentence (started, stopped, worker respawned…)."""
    if _format == "json":
        _write(json.dumps({"event": "message", "ts": round(time.time(), 3), "text": text}))
    else:
        _write(f"relayd: {text}")


def event(kind: str, **fields) -> None:
    if _format == "json":
        record = {"event": kind, "ts": round(time.time(), 3)}
        record.update({k: (v.decode("latin-1") if isinstance(v, bytes) else v)
                       for k, v in fields.items()})
        _write(json.dumps(record))
        return
    parts = []
    for k, v in fields.items():
        if isinstance(v, bytes):
            v = v.decode("latin-1")
        parts.append(f"{k}={v!r}" if k in ("path", "reason", "peer") else f"{k}={v}")
    _write(f"relayd: {kind} " + " ".join(parts))


def _write(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass           # a closed stderr must not take the daemon down
