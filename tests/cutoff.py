"""A TCP proxy on loopback in front of a test server, that can be cut off and put back.

    with Cutoff(port) as proxy:         # clients reach the server through proxy.port
        proxy.cut()                     # its port refuses connections, as a killed server's does
        proxy.put_back()                # and forwards them again, on the same port

Cut, the proxy closes its listening socket and resets every connection it holds: a client's
next request is refused at once, as by a server killed with SIGKILL, and the server is there
again once put back (tests/s3server.py starts `weed` once, and cannot start it again on its data).
"""

from __future__ import annotations

import socket
import struct
import threading


class Cutoff:
    """A proxy to 127.0.0.1:`port` that can refuse connections (`cut`) and forward them again."""

    def __init__(self, port: int):
        self.target = port
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._serve()

    def __enter__(self) -> "Cutoff":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cut()

    def _serve(self) -> None:
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return  # cut
            with self._lock:
                self._connections += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(source, target), daemon=True).start()

    def cut(self) -> None:
        """Refuse connections from now on, and reset those open."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # (else a blocked accept keeps the port listening)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:  # a reset, not a goodbye: as a killed server's connections end
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()
            except OSError:
                pass

    def put_back(self) -> None:
        """Forward connections again, on the same port."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._serve()


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while chunk := source.recv(2**16):
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        for end in (source, target):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
