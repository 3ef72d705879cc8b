"""Blocking pops longer than the socket's timeout, on every redis-py meepo supports:
redis-py 6 and later take the read's timeout as an argument; 5.3-5.x read within the
socket's own, which meepo sets for that read (the benchmarks' venv has redis-py 5)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from meepo.transport import transport as transport_module
from meepo.transport.transport import Transport, encode, make_client

pytestmark = pytest.mark.timeout(60)

SOCKET_TIMEOUT = 0.3


@pytest.fixture(params=["read_timeout_argument", "socket_timeout_set_for_the_read"])
def transport(
    request: pytest.FixtureRequest, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Transport:
    if request.param == "socket_timeout_set_for_the_read":
        monkeypatch.setattr(transport_module, "READ_TAKES_TIMEOUT", False)
    elif not transport_module.READ_TAKES_TIMEOUT:
        pytest.skip("this redis-py has no read_response(timeout=)")
    client = make_client(redis_url, timeout=SOCKET_TIMEOUT)
    t = Transport(client, f"bp_{uuid.uuid4().hex[:8]}", "meepo:test:")
    request.addfinalizer(lambda: client.delete(*t.queue_keys.values()))
    return t


def test_a_blocking_pop_outlasting_the_socket_timeout_returns_empty(transport: Transport) -> None:
    began = time.monotonic()
    assert transport.pop(10, timeout=1.0) == ("default", [])
    assert time.monotonic() - began >= 0.9  # it waited its own timeout, not the socket's
    conn = transport.client.connection_pool.get_connection()
    try:  # the connection went back with the socket's own timeout
        assert conn._sock is not None and conn._sock.gettimeout() == SOCKET_TIMEOUT
    finally:
        transport.client.connection_pool.release(conn)


def test_a_message_sent_during_a_long_blocking_pop_is_returned(transport: Transport) -> None:
    key = transport.queue_keys["default"]
    sender = threading.Timer(0.6, lambda: transport.client.rpush(key, encode((7, 1))))
    sender.start()
    try:
        assert transport.pop(10, timeout=5.0) == ("default", [b"7:1"])
    finally:
        sender.join()
