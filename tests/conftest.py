"""Fixtures shared by the suite. Tests that claim the pipeline works use ``amqp_url``: a real
RabbitMQ, started by the README's test command (deploy/dev.sh test). No broker: the test
fails with a message saying how to start one; it is never skipped."""
from __future__ import annotations

import os
import uuid
from typing import Iterator

import pika
import pytest

from splitmq.shared.access import ManagementAPI

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
    """A fresh job id per test, so tests sharing the broker never see each other's messages;
    afterwards every queue and exchange of the job is deleted (as ``splitmq job delete`` does)."""
    job = "t" + uuid.uuid4().hex[:10]
    yield job
    delete_job(job)


def delete_job(job: str, admin_url: str = "http://guest:guest@localhost:15672") -> None:
    api = ManagementAPI(admin_url)
    prefix = f"splitmq.{job}."
    for name in api.names("queues", prefix):
        api.delete_queue(name)
    for name in api.names("exchanges", prefix):
        api.delete_exchange(name)
