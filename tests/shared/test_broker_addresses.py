"""Several broker addresses (a cluster's nodes) for every connection: parties, admin, status.

These run against the suite's one real broker, with dead addresses beside it; the failover
between live nodes of a real cluster is tests/test_cluster.py.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import Future

import pika
import pika.frame
import pika.spec
import pytest

from splitmq.shared import amqp, defaults, topology
from splitmq.shared.access import ManagementAPI
from splitmq.shared.amqp import addresses
from splitmq.shared.broker import Broker, _Outgoing
from splitmq.shared.errors import AccessRefused, BrokerError
from splitmq.workers import status
from tests.conftest import delete_job


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_address_list_is_read_from_commas_or_spaces_and_a_bad_entry_is_refused() -> None:
    # Given AMQP_URL values as users write them, When read, Then each address is one entry
    assert addresses("amqp://a:1/%2F, amqp://b:2/%2F amqps://c:3/%2F") == [
        "amqp://a:1/%2F", "amqp://b:2/%2F", "amqps://c:3/%2F"]
    assert addresses(["amqp://a:1/%2F,amqp://b:2/%2F"]) == ["amqp://a:1/%2F", "amqp://b:2/%2F"]
    # And an entry without a scheme, or no entry at all, is refused saying what is expected
    with pytest.raises(ValueError, match="must start with amqp://"):
        addresses("amqp://a:1/%2F,b:2")
    with pytest.raises(ValueError, match="no broker URL"):
        addresses(" , ")


def test_a_party_given_dead_addresses_beside_a_live_one_connects_without_backing_off(
        amqp_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # Given a list of two dead addresses and the live broker, in every order the shuffle may pick
    caplog.set_level(logging.WARNING, logger="splitmq.shared.broker")
    urls = [f"amqp://guest:guest@localhost:{dead_port()}/%2F", f"amqp://guest:guest@localhost:{dead_port()}/%2F",
            amqp_url]
    for attempt in range(4):
        b = Broker(",".join(urls), name=f"listed-{attempt}")
        # When it connects
        b.start()
        try:
            b.wait_ready(10)
            # Then it is on the live broker, having tried each dead one once, at once
            assert b.status() == "connected to localhost:5672"
        finally:
            b.close()
    assert not [r for r in caplog.records if "trying again in" in r.getMessage()], "a dead address cost a backoff"


def test_a_login_refused_by_one_address_is_tried_on_the_others_and_final_only_when_all_refuse(
        amqp_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the live broker listed first and, tried first, an address that refuses our login (in CI a
    # cluster node still booting refused the user the other nodes accepted, and the trainer exited)
    caplog.set_level(logging.WARNING, logger="splitmq.shared.broker")
    monkeypatch.setattr("splitmq.shared.broker.random.sample", lambda seq, k: list(seq))  # pop() takes the last
    refusing = amqp_url.replace("guest:guest@", "nobody:wrong@")
    b = Broker(f"{amqp_url},{refusing}", name="refused-once")
    # When the party connects
    b.start()
    try:
        # Then the refusal is logged and the other address is used
        b.wait_ready(10)
        assert b.status() == "connected to localhost:5672"
        assert any("ACCESS_REFUSED" in r.getMessage() for r in caplog.records)
    finally:
        b.close()
    # And the admin path does the same
    amqp.declare(f"{refusing},{amqp_url}", topology.job_layout("refusedonce"))
    delete_job("refusedonce")
    # And when every address refuses, the refusal is final, with its reason
    both = Broker(f"{refusing},{refusing.replace('nobody', 'noone')}", name="refused-twice")
    both.start()
    try:
        with pytest.raises(AccessRefused, match="refused the login"):
            both.wait_ready(10)
    finally:
        both.close()
    with pytest.raises(AccessRefused, match="ACCESS_REFUSED"):
        amqp.declare(refusing, topology.job_layout("refusedall"))


def test_a_node_that_drops_the_handshake_is_tried_again_not_taken_for_a_refused_login(
        caplog: pytest.LogCaptureFixture) -> None:
    # Given a node that answers the AMQP greeting and then drops the connection, as a RabbitMQ node
    # still booting did in CI (handshake_timeout); pika reports it as a probable authentication error
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                with conn:
                    conn.recv(8)
                    start = pika.spec.Connection.Start(server_properties={}, mechanisms="PLAIN", locales="en_US")
                    conn.sendall(pika.frame.Method(0, start).marshal())

    threading.Thread(target=serve, daemon=True).start()
    caplog.set_level(logging.WARNING, logger="splitmq.shared.broker")
    b = Broker(f"amqp://guest:guest@127.0.0.1:{port}/%2F", name="dropped")
    # When a party connects to it
    b.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("cannot connect" in r.getMessage() for r in caplog.records):
            time.sleep(0.02)  # polling the log, bounded by the deadline
        # Then it says it cannot connect and keeps trying, instead of exiting on a "wrong password"
        assert any("cannot connect" in r.getMessage() for r in caplog.records)
        b.check()
    finally:
        b.close()
        srv.close()


def test_declaring_and_admin_calls_use_whichever_node_answers(amqp_url: str, job_id: str) -> None:
    # Given address lists whose first entries are dead
    amqp_list = f"amqp://guest:guest@localhost:{dead_port()}/%2F,{amqp_url}"
    http_list = f"http://guest:guest@127.0.0.1:{dead_port()},http://guest:guest@localhost:15672"
    # When the job is declared and listed through them
    amqp.declare(amqp_list, topology.job_layout(job_id))
    # Then the management API calls and the status view read the live node
    assert topology.forward_queue(job_id) in ManagementAPI(http_list).names("queues", f"splitmq.{job_id}.")
    rows, failed = status.management_queues(http_list, "/", job_id)
    assert failed == [] and [r.kind for r in rows] == ["forward", "dlq"]
    # And with no live node, the status view says which endpoints did not answer
    rows, failed = status.management_queues(f"http://127.0.0.1:{dead_port()}", "/", job_id)
    assert rows == [] and len(failed) == 1


def test_an_existing_queue_with_another_replica_count_is_used_as_it_is_but_other_differences_refused(
        amqp_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # Given a job's queues declared with 3 replicas (the default)
    job = "t" + uuid.uuid4().hex[:10]
    try:
        amqp.declare(amqp_url, topology.job_layout(job))
        # When a party declares them with 5 replicas, Then that is accepted, with a warning
        caplog.set_level(logging.WARNING, logger="splitmq.shared.broker")
        amqp.declare(amqp_url, topology.with_replicas(topology.job_layout(job), 5))
        assert any("exists with 3 replicas" in r.getMessage() for r in caplog.records)
        # And when a queue also differs in another argument, the broker's refusal stands
        changed = topology.with_replicas(topology.job_layout(job), 5)
        queue = changed.queues[1]
        other = topology.Layout(changed.exchanges, (topology.Queue(queue.name, {**queue.arguments,
                                                                                "x-max-length": 7}),), ())
        with pytest.raises(BrokerError, match="x-max-length"):
            amqp.declare(amqp_url, other)
    finally:
        delete_job(job)


class _Conn:
    """A connection stand-in that records closes."""

    def __init__(self) -> None:
        self.is_open, self.closed = True, 0

    def close(self, reply_text: str = "") -> None:
        self.closed += 1
        self.is_open = False


def test_a_publish_nacked_for_seconds_moves_the_party_to_another_node_once_and_is_sent_again() -> None:
    # Given a party on node 1 of two whose channel was ready 10 s ago, and a publish the broker keeps nacking
    b = Broker("amqp://guest:guest@localhost:1,amqp://guest:guest@localhost:2", name="p")
    conn, later = _Conn(), []
    b._conn, b._opened_at = conn, time.monotonic() - 10  # type: ignore[assignment]
    b._ioloop = type("Loop", (), {"call_later": lambda _self, delay, fn: later.append(fn)})()  # type: ignore[assignment]
    out = _Outgoing("x", "k", b"", pika.BasicProperties(message_id="m1"), Future())
    # When it is nacked first now, then again after the move threshold, then once more
    b._nacked(out)
    first = conn.closed
    out.first_nack = time.monotonic() - defaults.NACK_MOVE_S - 1
    b._nacked(out)
    b._nacked(out)
    # Then only the lasting refusal closed the connection (once: the reconnect tries the other node),
    # and every nack scheduled the publish again instead of failing it
    assert first == 0 and conn.closed == 1
    assert len(later) == 3 and not out.future.done()
