"""The delaying proxy that stands in for an edge link: it forwards bytes both ways, late,
and refuses to point anywhere but loopback."""
from __future__ import annotations

import socket
import threading

import pytest

from splitmq.bench.proxy import DelayProxy, proxied_url, upstream_of


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_the_proxy_carries_bytes_both_ways_in_order() -> None:
    # Given an echo server behind a proxy adding 5 ms each way
    server, thread = _echo_server()
    payload = bytes(range(256)) * 2000  # 512 KB: several chunks each way
    with DelayProxy(upstream_host="127.0.0.1", upstream_port=server.getsockname()[1], delay_s=0.005) as proxy:
        # When a client sends through the proxy and reads the echo back
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
            client.sendall(payload)
            received = bytearray()
            while len(received) < len(payload):
                chunk = client.recv(65536)
                assert chunk, "proxy closed early"
                received += chunk
    server.close()
    thread.join(timeout=5)

    # Then every byte came back, in order
    assert bytes(received) == payload
    assert proxy.connections == 1


def test_the_proxy_refuses_a_non_loopback_upstream_and_absurd_delays() -> None:
    # Given / When / Then
    with pytest.raises(ValueError, match="loopback"):
        DelayProxy(upstream_host="10.0.0.1", upstream_port=5672, delay_s=0.01)
    with pytest.raises(ValueError, match="delay_s"):
        DelayProxy(upstream_host="localhost", upstream_port=5672, delay_s=5)


def test_a_broker_url_is_pointed_at_the_proxy_keeping_credentials_and_vhost() -> None:
    # Given a broker URL
    url = "amqp://guest:guest@localhost:5672/%2F"

    # When it is rewritten for a proxy on port 40000
    # Then only host and port change
    assert proxied_url(url, 40000) == "amqp://guest:guest@127.0.0.1:40000/%2F"
    assert upstream_of(url) == ("localhost", 5672)
    assert upstream_of("amqp://h") == ("h", 5672)
