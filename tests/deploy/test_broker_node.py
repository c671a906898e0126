"""A node started by deploy/broker.sh keeps accepting connections with hundreds of queues.

RabbitMQ hands out sockets and files within the node's open-file limit and counts a few for
every quorum queue. Started through the Debian wrapper (su), a node got the shell's 1024: at
about 300 queues every new connection then hung in the AMQP handshake while the node looked
idle (seen 2026-11-24). deploy/broker.sh now starts it with a limit of its own.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pika

from tests.conftest import RESTART_NODE, STATE_ROOT

#: Well past where the node stopped accepting connections at the old limit (about 300).
QUEUES = 400


def open_files_limit(node: str) -> str:
    """The soft limit of open files of ``node``'s Erlang VM, as /proc writes it."""
    pid = (STATE_ROOT / f"broker-{node}" / "rabbitmq.pid").read_text().split()[0]
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return next(line.split()[3] for line in limits if line.startswith("Max open files"))


def test_a_node_holding_four_hundred_quorum_queues_still_accepts_a_new_connection(restart_node: str) -> None:
    # Given the second test node, started by deploy/broker.sh, holding 400 quorum queues
    prefix = f"splitmq.fd{uuid.uuid4().hex[:8]}."
    conn = pika.BlockingConnection(pika.URLParameters(restart_node))
    ch = conn.channel()
    try:
        for i in range(QUEUES):
            ch.queue_declare(f"{prefix}q{i}", durable=True, arguments={"x-queue-type": "quorum"})
        # When a new client connects (at the old limit, its handshake went unanswered: pika then
        # raises AMQPConnectorStackTimeout after stack_timeout)
        params = pika.URLParameters(restart_node)
        params.stack_timeout = 60
        pika.BlockingConnection(params).close()
        # Then it was accepted, and the node may open thousands of files
        soft = open_files_limit(RESTART_NODE["NODE"])
        assert soft == "unlimited" or int(soft) >= 4096, soft
    finally:
        for i in range(QUEUES):
            ch.queue_delete(f"{prefix}q{i}")
        conn.close()
