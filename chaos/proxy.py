"""A forwarding TCP proxy that can go silent: the harness's network partition.

One proxy per worker and per server (database, Redis) runs in the harness process, so
the harness can cut one worker off from one server while the others go on. A partition
here is *silent*, as a vanished host or a dropped route is: open connections stay open,
nothing more is forwarded either way, no reset is sent, and new connections are
accepted and then ignored. ``heal()`` forwards again (what was held back is delivered,
late, as TCP would after a short partition).

When the real server is down (a crash the harness injected), a new connection is reset
at once, as the server's host would do.
"""

from __future__ import annotations

import socket
import struct
import threading


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), so the peer sees the connection die."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class SilentProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; ``partition()`` / ``heal()``."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self._lock = threading.Lock()
        self._healed = threading.Condition(self._lock)
        self._silent = False
        self._held: list[socket.socket] = []  # accepted while silent
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()

    @property
    def silent(self) -> bool:
        return self._silent

    def partition(self) -> None:
        with self._lock:
            self._silent = True

    def heal(self) -> None:
        with self._lock:
            self._silent = False
            held, self._held = self._held, []
            self._healed.notify_all()
        for client in held:
            self._forward(client)

    def stop(self) -> None:
        self.heal()
        self._stopped.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if self._silent:
                    self._held.append(client)
                    continue
            self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        for s in (client, upstream):
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(262144)
                if not data:
                    break
                if self._silent:
                    with self._lock:  # hold it back until healed
                        while self._silent and not self._stopped.is_set():
                            self._healed.wait(0.5)
                dst.sendall(data)
        except OSError:
            pass
        _reset(src)
        _reset(dst)
