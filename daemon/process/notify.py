"""The systemd notify protocol: one datagram to `$NOTIFY_SOCKET` per state change."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager; False when none is listening."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    try:
        # Never wait on the manager: a listener that stopped reading must not stall draining or stopping.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.connect(path)
            sock.send(state.encode())
    except OSError:  # no listener, or its queue is full (BlockingIOError)
        return False
    return True
