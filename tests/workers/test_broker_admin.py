"""``splitmq broker``: definitions, and least-privilege users tried against the real broker.

Each test makes broker users with unique names through the CLI (as an operator would) and
removes them in teardown. Every refusal is paired with the allowed action next to it, so a
test cannot pass just because the user can do nothing at all.
"""
from __future__ import annotations

import base64
import json
import re
import time
import uuid
from concurrent.futures import Future
from typing import Any, Callable, Iterator

import pika
import pika.exceptions
import pytest

import dataclasses

import torch

from splitmq.shared import access, amqp, topology, wire
from splitmq.shared.broker import Broker, Delivery
from splitmq.shared.errors import AccessRefused, BrokerError, RejectedMessage
from splitmq.workers import broker_admin, cli, gate
from splitmq.workers.roles.base import Inbound, Source

WAIT_S = 15.0


def splitmq(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def add_client(capsys: pytest.CaptureFixture[str], name: str, job: str) -> dict[str, Any]:
    code, out = splitmq(capsys, "broker", "add-client", name, "--job-id", job, "--json")
    assert code == 0, out
    return json.loads(out)


@pytest.fixture
def clients(job_id: str, capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Two fresh clients, A and B, of one job; revoked (queues deleted) afterwards."""
    tag = uuid.uuid4().hex[:8]
    made: list[str] = []
    try:
        a = add_client(capsys, f"sec-{tag}-a", job_id)
        made.append(a["username"])
        b = add_client(capsys, f"sec-{tag}-b", job_id)
        made.append(b["username"])
        yield a, b
    finally:
        for name in made:
            cli.main(["broker", "remove-client", name, "--job-id", job_id, "--delete-queue"])


def connected(url: str, name: str) -> Broker:
    b = Broker(url, name=name)
    b.start()
    b.wait_ready(WAIT_S)
    return b


def fatal_error(b: Broker) -> BrokerError:
    """Wait (with a deadline) for the broker to close this connection's channel, and say why."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            b.check()
        except BrokerError as exc:
            return exc
        time.sleep(0.02)  # polling a condition, bounded by the deadline
    raise AssertionError("the broker did not refuse within the deadline")


def publish_forward(b: Broker, job: str, routing_key: str, **kwargs: Any) -> Future[None]:
    return b.publish(topology.activations_exchange(job), routing_key, b"payload",
                     message_id=uuid.uuid4().hex, **kwargs)


def raw_channel_refusal(url: str, action: Callable[[Any], Any]) -> int:
    """Run one raw pika channel action; return the reply code the broker closed the channel with."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            action(conn.channel())
        return int(info.value.reply_code)
    finally:
        if conn.is_open:
            conn.close()


# ---- definitions -----------------------------------------------------------------------

def test_the_committed_definitions_file_is_what_the_topology_generates() -> None:
    # Given the committed broker_config/definitions.json, When regenerated, Then it is identical
    assert broker_admin.DEFINITIONS_PATH.read_text() == broker_admin.definitions_text()


def test_client_permissions_match_only_its_own_names() -> None:
    # Given client c1 of job j
    perms = access.client_permissions("j", "c1")
    # Then it may publish activations only as itself, and read only its own reply queue
    assert perms.allows("write", topology.activations_exchange("j"))
    assert not perms.allows("write", topology.gradients_exchange("j"))
    assert perms.allows("read", topology.reply_queue("j", "c1"))
    assert not perms.allows("read", topology.reply_queue("j", "c10"))
    assert not perms.allows("configure", topology.reply_queue("j", "c1"))
    assert perms.allows("configure", topology.lease_queue("j", "c1"))
    assert not perms.allows("configure", topology.lease_queue("j", "c10"))
    topic = perms.topics[0]
    assert topic.exchange == topology.activations_exchange("j")
    assert re.search(topic.write, topology.forward_routing_key("c1"))
    assert not re.search(topic.write, topology.forward_routing_key("c10"))


# ---- real users on the broker ----------------------------------------------------------

def test_a_client_can_publish_its_activations_and_read_its_own_gradients(
        amqp_url: str, job_id: str, clients: tuple[dict[str, Any], dict[str, Any]]) -> None:
    # Given client A connected with its own credentials, consuming its reply queue
    a, _ = clients
    got: list[Delivery] = []
    client = connected(a["amqp_url"], "sec-a")
    admin = connected(amqp_url, "sec-admin")
    try:
        client.consume(a["reply_queue"], got.append)
        # When it publishes under its own routing key, and the trainer answers on its queue
        publish_forward(client, job_id, a["routing_keys"][0]).result(WAIT_S)
        admin.publish(topology.gradients_exchange(job_id), topology.reply_routing_key(a["client_id"]),
                      b"grad", message_id="g1").result(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        # Then both succeed
        assert [d.body for d in got] == [b"grad"]
        assert amqp.queue_depth(amqp_url, topology.forward_queue(job_id)) == 1
    finally:
        client.close()
        admin.close()


def test_a_client_is_refused_reading_another_clients_reply_queue(
        job_id: str, clients: tuple[dict[str, Any], dict[str, Any]]) -> None:
    # Given client A connected
    a, b = clients
    client = connected(a["amqp_url"], "sec-a")
    try:
        # When it tries to consume B's reply queue (B's gradients)
        client.consume(b["reply_queue"], lambda d: None)
        # Then the broker refuses it access
        err = fatal_error(client)
        assert isinstance(err, AccessRefused) and "ACCESS_REFUSED" in str(err)
    finally:
        client.close()


def test_a_client_is_refused_publishing_under_another_clients_routing_key(
        job_id: str, clients: tuple[dict[str, Any], dict[str, Any]]) -> None:
    # Given client A connected
    a, b = clients
    client = connected(a["amqp_url"], "sec-a")
    try:
        # When it publishes activations under B's routing key
        future = publish_forward(client, job_id, b["routing_keys"][0])
        # Then the publish fails: access refused by the topic permission
        with pytest.raises(AccessRefused, match="ACCESS_REFUSED"):
            future.result(WAIT_S)
    finally:
        client.close()


def test_a_client_is_refused_publishing_with_another_clients_user_id(
        job_id: str, clients: tuple[dict[str, Any], dict[str, Any]]) -> None:
    # Given client A connected
    a, b = clients
    client = connected(a["amqp_url"], "sec-a")
    try:
        # When it publishes under its own key but claims to be user B
        future = publish_forward(client, job_id, a["routing_keys"][0], user_id=b["username"])
        # Then the broker refuses the message (it checks user_id against the login)
        with pytest.raises(BrokerError, match="user_id"):
            future.result(WAIT_S)
    finally:
        client.close()


def test_a_client_is_refused_publishing_straight_to_a_queue(
        job_id: str, clients: tuple[dict[str, Any], dict[str, Any]]) -> None:
    # Given client A, When it publishes through the default exchange to B's queue
    a, b = clients
    client = connected(a["amqp_url"], "sec-a")
    try:
        future = client.publish("", b["reply_queue"], b"fake gradient", message_id="x")
        # Then access is refused
        with pytest.raises(AccessRefused):
            future.result(WAIT_S)
    finally:
        client.close()


def test_a_client_is_refused_declaring_queues(job_id: str, clients: tuple[dict[str, Any], dict[str, Any]]) -> None:
    # Given client A, When it declares a new queue, or re-declares its own
    a, _ = clients
    for name in (f"splitmq.{job_id}.reply.evil", a["reply_queue"]):
        layout = topology.Layout((), (topology.Queue(name, topology.forward_queue_arguments(job_id)),), ())
        # Then access is refused
        with pytest.raises(AccessRefused):
            amqp.declare(a["amqp_url"], layout)


def test_a_client_is_refused_deleting_queues(job_id: str, clients: tuple[dict[str, Any], dict[str, Any]]) -> None:
    # Given client A, When it deletes B's queue, its own, or the trainer's forward queue
    a, b = clients
    for queue in (b["reply_queue"], a["reply_queue"], topology.forward_queue(job_id)):
        # Then the broker closes the channel with 403 ACCESS_REFUSED
        assert raw_channel_refusal(a["amqp_url"], lambda ch: ch.queue_delete(queue)) == 403


def test_the_trainer_sees_the_broker_validated_sender_and_rejects_messages_without_one(
        amqp_url: str, job_id: str, clients: tuple[dict[str, Any], dict[str, Any]]) -> None:
    # Given client A publishing one message with its user_id and one without
    a, _ = clients
    client = connected(a["amqp_url"], "sec-a")
    try:
        publish_forward(client, job_id, a["routing_keys"][0], user_id=a["username"]).result(WAIT_S)
        publish_forward(client, job_id, a["routing_keys"][0]).result(WAIT_S)
    finally:
        client.close()
    # When the trainer's gate reads them as under --require-identity
    signed, unsigned = amqp.get_messages(amqp_url, topology.forward_queue(job_id))
    body = wire.Forward(job_id=job_id, client_id=a["client_id"], seq=0, activations=torch.ones(1, 4)).encode()
    inbound = Inbound("q", Source.FORWARD, frozenset({wire.Kind.FORWARD}), 1 << 20)
    rules = gate.GateRules(job_id=job_id, require_identity=True)

    def admit(d: Delivery) -> Any:
        return gate.admit(dataclasses.replace(d, body=body, reply_to=a["client_id"]), inbound, rules)
    # Then the first names A (the broker vouched for it) and passes; the second is rejected for identity
    assert signed.user_id == a["username"] and unsigned.user_id is None
    assert admit(signed).sender == a["client_id"]
    with pytest.raises(RejectedMessage) as info:
        admit(unsigned)
    assert info.value.reason == "identity"


def test_a_trainer_user_serves_its_queue_but_cannot_read_a_clients_gradients(
        amqp_url: str, job_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a trainer user made with add-trainer (and the job declared by the admin)
    name = f"sec-{uuid.uuid4().hex[:8]}-t"
    code, out = splitmq(capsys, "broker", "add-trainer", name, "--job-id", job_id, "--json")
    assert code == 0, out
    url = json.loads(out)["amqp_url"]
    amqp.declare(amqp_url, topology.job_layout(job_id, parties=("client-0",)))
    try:
        trainer = connected(url, "sec-t")
        try:
            # When it consumes its forward queue and answers a client on the gradients exchange
            trainer.consume(topology.forward_queue(job_id), lambda d: None)
            trainer.publish(topology.gradients_exchange(job_id), topology.reply_routing_key("client-0"),
                            b"grad", message_id="g").result(WAIT_S)
            # Then that works
            assert amqp.queue_depth(amqp_url, topology.reply_queue(job_id, "client-0")) == 1
        finally:
            trainer.close()
        # But reading a client's reply queue, or declaring, is refused
        assert raw_channel_refusal(url, lambda ch: ch.basic_get(topology.reply_queue(job_id, "client-0"))) == 403
        with pytest.raises(AccessRefused):
            amqp.declare(url, topology.job_layout(job_id))
    finally:
        cli.main(["broker", "remove-client", name, "--job-id", job_id])


def test_removing_a_client_closes_its_connections_and_refuses_its_login(
        job_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Given client A connected
    name = f"sec-{uuid.uuid4().hex[:8]}-r"
    a = add_client(capsys, name, job_id)
    try:
        client = connected(a["amqp_url"], "sec-r")
        # When the operator removes it
        code, out = splitmq(capsys, "broker", "remove-client", name, "--job-id", job_id)
        assert code == 0 and "removed" in out
        # Then its connection is closed, its automatic reconnect is refused, and so is a new login
        assert isinstance(fatal_error(client), AccessRefused)
        client.close()
        with pytest.raises(AccessRefused):
            connected(a["amqp_url"], "sec-r2")
    finally:
        cli.main(["broker", "remove-client", name, "--job-id", job_id, "--delete-queue"])


def test_a_client_may_check_that_its_reply_queue_exists(
        job_id: str, clients: tuple[dict[str, Any], dict[str, Any]]) -> None:
    # Given client A (the worker checks its queue passively when it may not declare it)
    a, _ = clients
    # When it asks for its reply queue's depth, Then the broker answers
    assert amqp.queue_depth(a["amqp_url"], a["reply_queue"]) == 0


def test_persisted_users_carry_only_a_password_hash(
        job_id: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a client added with a definitions directory
    name = f"sec-{uuid.uuid4().hex[:8]}-p"
    code, out = splitmq(capsys, "broker", "add-client", name, "--job-id", job_id, "--json",
                        "--definitions-dir", str(tmp_path))
    try:
        assert code == 0, out
        password = json.loads(out)["password"]
        path = tmp_path / f"user-{name}.json"
        # Then the file holds RabbitMQ's salted hash of the password, never the password
        text = path.read_text()
        assert password not in text and path.stat().st_mode & 0o077 == 0
        user = json.loads(text)["users"][0]
        salt = base64.b64decode(user["password_hash"])[:4]
        assert user["password_hash"] == access.password_hash(password, salt)
    finally:
        splitmq(capsys, "broker", "remove-client", name, "--job-id", job_id, "--delete-queue",
                "--definitions-dir", str(tmp_path))
    # And removing the client removes its file
    assert not (tmp_path / f"user-{name}.json").exists()


def test_setup_declares_a_transient_jobs_queues_as_its_parties_expect_them(
        job_id: str, amqp_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Given an operator declaring a transient job's queues for least-privilege parties
    code, out = splitmq(capsys, "broker", "setup", "--job-id", job_id, "--client", "client-0",
                        "--delivery", "transient")
    assert code == 0, out
    # Then its parties' own declaration (classic forward and reply queues) agrees with them
    layout = topology.with_replicas(topology.job_layout(job_id, parties=("client-0",)), topology.QUORUM_REPLICAS)
    amqp.declare(amqp_url, topology.with_delivery(layout, "transient"))
    # and a durable job's would not (RabbitMQ refuses to redeclare a queue with other arguments)
    with pytest.raises(BrokerError, match="inequivalent arg"):
        amqp.declare(amqp_url, layout)
