"""Fixtures shared by the suite. Tests that claim the pipeline works use ``amqp_url``: a real
RabbitMQ, started by the README's test command (deploy/dev.sh test). No broker: the test
fails with a message saying how to start one; it is never skipped."""
from __future__ import annotations

import os
import uuid
from typing import Iterator

import pika
import pytest

from splitmq.shared import broker, topology

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except Exception as exc:  # any failure here means the same thing to the reader
        pytest.fail(f"no RabbitMQ at {AMQP_URL} ({exc!r}). Start one with deploy/broker.sh start, "
                    "or run the suite with deploy/dev.sh test, which starts it.")
    return AMQP_URL


@pytest.fixture
def job_id(amqp_url: str) -> Iterator[str]:
    """A fresh job id per test, so tests sharing the broker never see each other's messages."""
    job = "t" + uuid.uuid4().hex[:10]
    yield job
    prefix = f"splitmq.{job}."
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        names = [topology.forward_queue(job, s) for s in ("top", "mid", "head", "fed")]
        names += [topology.dead_letter_queue(job)]
        names += [topology.reply_queue(job, f"client-{i}") for i in range(16)]
        for name in names:
            assert name.startswith(prefix)
            conn.channel().queue_delete(name)
        for ex in (topology.activations_exchange(job), topology.gradients_exchange(job),
                   topology.dead_letter_exchange(job)):
            conn.channel().exchange_delete(ex)
    finally:
        conn.close()
