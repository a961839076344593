"""New connections, one after another, each asking `GET /version` and reading to the close:
what a reload or a respawn must never reset or refuse. Counts every outcome by kind."""
from __future__ import annotations

import socket
import threading
import time

REQUEST = b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def ask_once(port: int, timeout_s: float = 5.0) -> str | None:
    """None when the answer is a whole 200 response, else what went wrong."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(REQUEST)
            data = b""
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    return None if data.startswith(b"HTTP/1.1 200") else f"answer {data[:12]!r}"
                data += chunk
            return "not closed"
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except OSError as e:
        return type(e).__name__


class ConnectionHammer(threading.Thread):
    """Asks until `stop` is set; `total` and `failures` (kind -> count) say how it went."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.total = 0
        self.failures: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            self.total += 1
            kind = ask_once(self.port)
            if kind:
                self.failures[kind] = self.failures.get(kind, 0) + 1
