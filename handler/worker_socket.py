"""One writer at a time on the TorchServe worker's socket.

TorchServe's async worker sends each request's last reply from a thread of its own, while the handler streams
from the event loop. Two large `sendall` calls at once can interleave their bytes and break the frontend's
framing of the messages. (This lives apart from the handler module: TorchServe wants exactly one class there.)
"""
from __future__ import annotations

import socket
import threading
from typing import Any


class SerialSocket(socket.socket):
    """A socket whose `sendall` calls never overlap."""

    __slots__ = ()
    _send_lock = threading.Lock()

    def sendall(self, data: Any, flags: int = 0) -> None:
        with self._send_lock:
            super().sendall(data, flags)


def serialize_sends(sock: Any) -> None:
    """Make every later `sendall` on the worker's socket, TorchServe's own included, wait for the one before."""
    if type(sock) is socket.socket:
        sock.__class__ = SerialSocket
