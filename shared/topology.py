"""The one place that knows exchange, queue and routing-key names, and their arguments.

Names are scoped by job id so several jobs can share a broker. Every party that sends
forward messages has a reply queue; every party that consumes forward messages has a
forward queue. Multi-hop, U-shaped and several-owner runs are arrangements of these two.

    activations exchange (topic)  --"<sender>.<dest>"-->  forward queue of <dest>
    gradients exchange (direct)   --"<recipient>"----->  reply queue of <recipient>
    rejected / over-limit messages --> dead-letter exchange (fanout) --> dead-letter queue

``broker_config/definitions.json`` is generated from this module (``splitmq broker
definitions``) and a test checks the two agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_JOB = "mnist"
#: The conventional name of the stage that holds the top segment and the loss.
TOP_STAGE = "top"

#: Redeliveries before a message that keeps failing is dead-lettered (quorum queues).
DELIVERY_LIMIT = 5
#: How long set-aside messages stay in the dead-letter queue (ms): one week.
DEAD_LETTER_TTL_MS = 7 * 24 * 3600 * 1000
#: Cap on a queue's length; publishers see a nack (``PublishNacked``) beyond it.
MAX_QUEUE_LENGTH = 100_000

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_name(kind: str, name: str) -> str:
    """Job, client and stage names become parts of routing keys: no dots, no wildcards.

    Raises:
        ValueError: if ``name`` is not 1-64 characters of letters, digits, ``_`` or ``-``.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"{kind} name {name!r} must be 1-64 of [A-Za-z0-9_-]")
    return name


def activations_exchange(job: str) -> str:
    return f"splitmq.{check_name('job', job)}.activations"


def gradients_exchange(job: str) -> str:
    return f"splitmq.{check_name('job', job)}.gradients"


def dead_letter_exchange(job: str) -> str:
    return f"splitmq.{check_name('job', job)}.dlx"


def dead_letter_queue(job: str) -> str:
    return f"splitmq.{check_name('job', job)}.dlq"


def forward_queue(job: str, stage: str = TOP_STAGE) -> str:
    """The queue a stage consumes forward messages (activations) from."""
    return f"splitmq.{check_name('job', job)}.forward.{check_name('stage', stage)}"


def reply_queue(job: str, party: str) -> str:
    """The queue a party consumes backward messages (gradients) and hand-offs from."""
    return f"splitmq.{check_name('job', job)}.reply.{check_name('client', party)}"


def forward_routing_key(sender: str, dest: str = TOP_STAGE) -> str:
    """Routing key of a forward message; the sender comes first so topic permissions can pin it."""
    return f"{check_name('client', sender)}.{check_name('stage', dest)}"


def forward_binding(dest: str = TOP_STAGE) -> str:
    return f"*.{check_name('stage', dest)}"


def reply_routing_key(party: str) -> str:
    return check_name("client", party)


def work_queue_arguments(job: str) -> dict[str, Any]:
    """Arguments of every forward and reply queue: durable quorum, bounded, dead-lettering."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": dead_letter_exchange(job),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-max-length": MAX_QUEUE_LENGTH,
    }


def dead_letter_queue_arguments() -> dict[str, Any]:
    return {"x-queue-type": "quorum", "x-message-ttl": DEAD_LETTER_TTL_MS}


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


@dataclass(frozen=True)
class Layout:
    """Everything to declare for a job: exchanges, queues and bindings, in declaration order."""

    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]
    bindings: tuple[Binding, ...]


def job_layout(job: str, stages: tuple[str, ...] = (TOP_STAGE,), parties: tuple[str, ...] = ()) -> Layout:
    """The topology of one job: shared exchanges, each stage's forward queue, each party's reply queue."""
    args = work_queue_arguments(job)
    exchanges = (
        Exchange(activations_exchange(job), "topic"),
        Exchange(gradients_exchange(job), "direct"),
        Exchange(dead_letter_exchange(job), "fanout"),
    )
    queues = [Queue(dead_letter_queue(job), dead_letter_queue_arguments())]
    bindings = [Binding(dead_letter_exchange(job), dead_letter_queue(job), "")]
    for stage in stages:
        queues.append(Queue(forward_queue(job, stage), args))
        bindings.append(Binding(activations_exchange(job), forward_queue(job, stage), forward_binding(stage)))
    for party in parties:
        queues.append(Queue(reply_queue(job, party), args))
        bindings.append(Binding(gradients_exchange(job), reply_queue(job, party), reply_routing_key(party)))
    return Layout(tuple(exchanges), tuple(queues), tuple(bindings))


def client_layout(job: str, party: str) -> Layout:
    """What a new party needs: the job's exchanges, and its own reply queue and binding."""
    full = job_layout(job, stages=(), parties=(party,))
    return Layout(full.exchanges, full.queues[1:], full.bindings[1:])


def definitions(layout: Layout, vhost: str = "/") -> dict[str, Any]:
    """RabbitMQ definitions-file fragment (exchanges, queues, bindings) for ``layout``."""
    return {
        "exchanges": [
            {"name": e.name, "vhost": vhost, "type": e.type, "durable": True,
             "auto_delete": False, "internal": False, "arguments": {}}
            for e in layout.exchanges
        ],
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False,
             "arguments": q.arguments}
            for q in layout.queues
        ],
        "bindings": [
            {"source": b.exchange, "vhost": vhost, "destination": b.queue,
             "destination_type": "queue", "routing_key": b.routing_key, "arguments": {}}
            for b in layout.bindings
        ],
    }
