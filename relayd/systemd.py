"""sd_notify only: a datagram to $NOTIFY_SOCKET, no dependency. No-op outside systemd."""
from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send `READY=1`-style fields; True when a notify socket took them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]            # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
        return True
    except OSError:
        return False
