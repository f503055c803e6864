"""A TCP relay that can go silent: a network partition between one client and a real server.

While the link is cut it forwards no byte either way and answers no new connection past the
kernel's handshake, yet resets nothing: the client's requests get no answer and no error, as when
a node loses its network. Bytes held back meanwhile are forwarded once the link is healed. The
server on the far side is the real one (the test control plane's API server); only the way to it
is interrupted.

It can also play a server that is down (``down``): every open connection is closed and every new
one closed as soon as it is made, so each request fails at once, as while an API server restarts.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

POLL_SECONDS = 0.05


class SilentLink:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._down = threading.Event()
        self._closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="silent-link", daemon=True).start()

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._down.clear()
        self._open.set()

    def down(self) -> None:
        """Until ``heal``: close every connection, and each new one once accepted."""
        self._down.set()
        self._drop()

    def _drop(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._closed.set()
        self._open.set()
        with self._lock:
            for s in [self._listener, *self._sockets]:
                with contextlib.suppress(OSError):
                    s.close()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.add(s)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down.is_set():
                client.close()
                continue
            self._track(client)
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._open.wait()  # a connection made while cut waits, unanswered, for the link to heal
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        if self._down.is_set():  # went down while this connection was being made
            upstream.close()
            client.close()
            return
        self._track(upstream)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                if not self._open.is_set():
                    self._open.wait(POLL_SECONDS)  # cut: leave the bytes where they are
                    continue
                ready, _, _ = select.select([source], [], [], POLL_SECONDS)
                if not ready:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                self._open.wait()  # cut between the read and the write: hold the bytes
                sink.sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket ``down`` has closed
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
