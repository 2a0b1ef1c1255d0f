"""A TCP relay on loopback that passes requests on but can hold back every answer.

With ``hold`` set, what the client sends still reaches the server (an upload completes there)
while the server's answers stay here: the client is left waiting as if the network had died
after the server acted, which is the moment a crash test needs to catch.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field


@dataclass
class HoldProxy:
    port: int
    hold: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _pipe(source: socket.socket, target: socket.socket, gate: threading.Event | None) -> None:
    try:
        while data := source.recv(65536):
            if gate is not None and gate.is_set():
                continue
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def hold_proxy(upstream_port: int) -> Iterator[HoldProxy]:
    listener = socket.create_server(("127.0.0.1", 0))
    proxy = HoldProxy(port=listener.getsockname()[1])
    open_sockets: list[socket.socket] = [listener]

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", upstream_port))
            open_sockets.extend((client, server))
            threading.Thread(target=_pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=_pipe, args=(server, client, proxy.hold), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield proxy
    finally:
        for sock in open_sockets:
            sock.close()
