"""A forwarding TCP proxy for outages: reset, silent (a partition) or a lost reply.

``TcpProxy`` is the one implementation, used by the tests (``tests/helpers.py``) and by
the harness; ``SilentProxy`` is the harness's view of it.

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


class TcpProxy:
    """A TCP forwarder from a loopback port to a real server, for outages.

    ``close()`` resets every open connection and every new one at once, as a server
    that went away would look to its clients; ``open()`` forwards again. It starts
    closed. ``blackhole()`` makes it go silent instead, without a reset: open
    connections stay open but nothing more is forwarded either way, and new ones are
    accepted and then ignored (a partition, or a host that vanished behind a load
    balancer); ``open()`` heals it (what was held back is delivered).
    ``lose_next_reply()`` drops the next data the server sends (on any connection) and
    resets that connection: the command reached the server and ran, its reply is lost
    (a reset or timeout after a command was sent). The port stays
    bound from construction to ``stop()``, so that no other process (tests run in
    parallel) can take it during an outage. ``url(real_url)`` is a SQLAlchemy URL
    ``real_url`` rewritten to go through the proxy.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._up = False
        self._silent = False
        self._lose_reply = False
        self._heal = threading.Condition(self._lock)
        self._held: list[socket.socket] = []  # accepted while silent, not yet forwarded
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def to(cls, url: str) -> TcpProxy:
        from sqlalchemy.engine import make_url

        u = make_url(url)
        return cls(u.host or "127.0.0.1", int(u.port or 0))

    def url(self, url: str) -> str:
        from sqlalchemy.engine import make_url

        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(False)

    def open(self) -> TcpProxy:
        with self._lock:
            self._up = True
            self._silent = False
            held, self._held = self._held, []
            self._heal.notify_all()
        for client in held:
            self._forward(client)
        return self

    def blackhole(self) -> None:
        """Stop forwarding without a reset (see the class docstring)."""
        with self._lock:
            self._up = True
            self._silent = True

    def lose_next_reply(self) -> None:
        """Drop the server's next reply and reset its connection (see the class
        docstring)."""
        with self._lock:
            self._lose_reply = True

    def close(self) -> None:
        with self._lock:
            self._up = False
            self._silent = False
            conns, self._conns = self._conns, set()
            held, self._held = self._held, []
            self._heal.notify_all()
        for c in [*conns, *held]:
            _reset(c)

    def stop(self) -> None:
        self.close()
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
                up, silent = self._up, self._silent
                if up and silent:
                    self._held.append(client)
                    continue
            if not up:
                _reset(client)
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
        with self._lock:
            if not self._up:
                _reset(client)
                _reset(upstream)
                return
            self._conns.update((client, upstream))
        for a, b, reply in ((client, upstream, False), (upstream, client, True)):
            threading.Thread(target=self._pump, args=(a, b, reply), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, reply: bool) -> None:
        try:
            while True:
                data = src.recv(262144)
                if not data:
                    break
                if self._silent or not self._up or (reply and self._lose_reply):
                    with self._lock:  # silent: hold the data back until healed or closed
                        while self._silent and self._up:
                            self._heal.wait()
                        if not self._up:
                            break
                        if reply and self._lose_reply:  # dropped, and the connection reset
                            self._lose_reply = False
                            break
                dst.sendall(data)
        except OSError:
            pass
        _reset(src)
        _reset(dst)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), so the peer sees the connection die."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class SilentProxy(TcpProxy):
    """Forwards 127.0.0.1:``port`` to ``target`` from the start; ``partition()`` makes it
    silent, ``heal()`` forwards again."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        super().__init__(host, target_port)
        self.open()

    @property
    def silent(self) -> bool:
        return self._silent

    def partition(self) -> None:
        self.blackhole()

    def heal(self) -> None:
        self.open()
