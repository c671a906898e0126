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

import dataclasses
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
#: Replicas of each quorum queue on a cluster (``x-quorum-initial-group-size``; the job setting
#: ``replicas`` overrides it through ``with_replicas``). A cluster with fewer nodes gives a queue
#: one per node; a publish is confirmed once a majority of them stored it, so three replicas
#: survive the loss of any one node.
QUORUM_REPLICAS = 3
REPLICAS_ARGUMENT = "x-quorum-initial-group-size"

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_name(kind: str, name: str) -> str:
    """Job, client and stage names become parts of routing keys: no dots, no wildcards.

    Raises:
        ValueError: if ``name`` is not 1-64 characters of letters, digits, ``_`` or ``-``.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"{kind} name {name!r} must be 1-64 of [A-Za-z0-9_-]")
    return name


# ---- party names and message ids: built and parsed here only --------------------------------

#: Data owners are named ``client-<index>`` unless given a name of their own.
_CLIENT_RE = re.compile(r"^client-(0|[1-9][0-9]{0,5})$")
#: Suffix of the stage name of a data owner's own head segment (U-shaped runs).
HEAD_SUFFIX = "-head"


def client_name(index: int) -> str:
    """The conventional name of data owner ``index``: ``client-<index>``."""
    if index < 0:
        raise ValueError(f"client index must be >= 0, got {index}")
    return f"client-{index}"


def client_index(name: str) -> int | None:
    """The index in a conventional ``client-<index>`` name, or None for a name of another form."""
    match = _CLIENT_RE.match(name)
    return int(match.group(1)) if match else None


def head_stage(client: str) -> str:
    """Stage name of a data owner's own head segment (U-shaped runs): ``<client>-head``."""
    return f"{check_name('client', client)}{HEAD_SUFFIX}"


# ---- shards: several trainers share a stage's data owners ----------------------------------

def shard_of(index: int, shards: int) -> int:
    """Which of ``shards`` trainers serves data owner ``index``: the sharding rule.

    Owners are dealt out in turn (``index mod shards``): every trainer knows, before anyone
    joins, exactly which owners it serves and whom an averaging round waits for; shards differ
    by at most one owner; and an owner keeps its trainer for the whole job (the exactly-once
    record of its batches lives in that trainer's checkpoint).
    """
    if shards < 1 or index < 0:
        raise ValueError(f"need shards >= 1 and index >= 0, got {shards} and {index}")
    return index % shards


def shard_stage(stage: str, shard: int) -> str:
    """Shard ``shard`` of ``stage`` (``top-s1``): the name of its party, forward and reply queues, lease."""
    return f"{check_name('stage', stage)}-s{shard}"


def shard_stages(stage: str, shards: int) -> tuple[str, ...]:
    """Every shard of ``stage``; just ``stage`` itself when it has one."""
    return (stage,) if shards == 1 else tuple(shard_stage(stage, k) for k in range(shards))


def owner_stage(stage: str, index: int, shards: int) -> str:
    """The stage data owner ``index`` sends to: ``stage``, or its shard of it."""
    return shard_stages(stage, shards)[shard_of(index, shards)]


def shard_owners(shard: int, shards: int, num_clients: int) -> frozenset[int]:
    """The owner indexes shard ``shard`` of ``shards`` serves."""
    return frozenset(i for i in range(num_clients) if shard_of(i, shards) == shard)


def batch_id(client: str, seq: int) -> str:
    """Message and correlation id of training batch ``seq`` of ``client``; re-sends keep it."""
    return f"{client}:{seq}"


def eval_id(client: str, epoch: int, index: int) -> str:
    """Correlation id of evaluation batch ``index`` of ``client``'s pass after ``epoch``."""
    return f"{client}:eval:{epoch}:{index}"


def request_id(client: str, what: str, key: int | str) -> str:
    """Correlation id of a request that is not a batch (``hello``, ``weights``, ``handoff``, ``bye``)."""
    return f"{client}:{what}:{key}"


def reply_id(message_id: str) -> str:
    """Message id of the answer to ``message_id`` (stable, so a re-sent answer de-duplicates)."""
    return f"{message_id}:reply"


def relay_id(correlation_id: str, stage: str) -> str:
    """Correlation id a middle stage gives the message it passes on for ``correlation_id``."""
    return f"{correlation_id}>{stage}"


def predict_id(requester: str, n: int) -> str:
    """Request id (and correlation id) of inference request ``n`` of ``requester``."""
    return request_id(requester, "predict", n)


def export_id(requester: str, holder: str, segment: int) -> str:
    """Request id of ``requester``'s export request for ``holder``'s segment ``segment``."""
    return request_id(requester, f"export-{check_name('client', holder)}", segment)


def dead_letter_id(message_id: str, nonce: int) -> str:
    """Message id of a dead-lettered copy of ``message_id`` (unique: a message may die twice)."""
    return f"dead:{message_id}:{nonce}"


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


def lease_queue(job: str, party: str) -> str:
    """An exclusive, auto-deleted queue a running party holds: a second party of its name is refused."""
    return f"splitmq.{check_name('job', job)}.lease.{check_name('client', party)}"


def reply_queue(job: str, party: str) -> str:
    """The queue a party consumes backward messages (gradients) and hand-offs from."""
    return f"splitmq.{check_name('job', job)}.reply.{check_name('client', party)}"


def forward_routing_key(sender: str, dest: str = TOP_STAGE) -> str:
    """Routing key of a forward message; the sender comes first so topic permissions can pin it."""
    return f"{check_name('client', sender)}.{check_name('stage', dest)}"


def sender_of(routing_key: str) -> str:
    """The sender part of a forward routing key (``<sender>.<dest>``), or "" if it has none."""
    sender, dot, _ = routing_key.partition(".")
    return sender if dot else ""


def forward_binding(dest: str = TOP_STAGE) -> str:
    return f"*.{check_name('stage', dest)}"


def reply_routing_key(party: str) -> str:
    return check_name("client", party)


# ---- serving: inference and export requests, kept apart from training's queues ---------------

#: Suffix of the address of a party's serving side: requests go to stage ``<name>-serve`` on the
#: activations exchange, answers to party ``<name>-serve`` on the gradients exchange.
SERVE_SUFFIX = "-serve"


def serve_address(name: str) -> str:
    """The stage (for requests) or party (for answers) name of ``name``'s serving side."""
    return f"{check_name('stage', name)}{SERVE_SUFFIX}"


def serve_queue(job: str, name: str) -> str:
    """The queue a party consumes inference and export requests from (never training batches)."""
    return f"splitmq.{check_name('job', job)}.serve.{check_name('stage', name)}"


def answer_queue(job: str, name: str) -> str:
    """The queue a party consumes the answers to its inference and export requests from."""
    return f"splitmq.{check_name('job', job)}.answers.{check_name('client', name)}"


def serve_lease(job: str, name: str) -> str:
    """The lease of a process serving as ``name`` apart from its training process (``splitmq predict``)."""
    return lease_queue(job, serve_address(name))


def work_queue_arguments(job: str) -> dict[str, Any]:
    """Arguments of every forward and reply queue: durable quorum, replicated, bounded, dead-lettering."""
    return {
        "x-queue-type": "quorum",
        REPLICAS_ARGUMENT: QUORUM_REPLICAS,
        "x-dead-letter-exchange": dead_letter_exchange(job),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-max-length": MAX_QUEUE_LENGTH,
    }


def forward_queue_arguments(job: str) -> dict[str, Any]:
    """A stage's queue also has a delivery limit: a batch that kills the whole process every time
    (no handler error to catch) is set aside after ``DELIVERY_LIMIT`` returns, and its owner re-sends
    it later if it was merely unlucky."""
    return {**work_queue_arguments(job), "x-delivery-limit": DELIVERY_LIMIT}


def reply_queue_arguments(job: str) -> dict[str, Any]:
    """An owner's queue has no delivery limit: an owner decides about each answer itself (applies it,
    or dead-letters it with a reason), and an owner killed again and again before it could checkpoint
    must find its gradients still there, however often that happens."""
    return work_queue_arguments(job)


def dead_letter_queue_arguments() -> dict[str, Any]:
    return {"x-queue-type": "quorum", REPLICAS_ARGUMENT: QUORUM_REPLICAS, "x-message-ttl": DEAD_LETTER_TTL_MS}


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    #: Carries training traffic (a stage's forwards, a party's answers): what ``delivery = transient`` makes classic.
    training: bool = False


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


def job_layout(job: str, stages: tuple[str, ...] = (TOP_STAGE,), parties: tuple[str, ...] = (),
               serving: tuple[str, ...] = ()) -> Layout:
    """The topology of one job: shared exchanges, each stage's forward queue, each party's reply queue,
    and, for each party in ``serving``, its serve and answer queues."""
    exchanges = (
        Exchange(activations_exchange(job), "topic"),
        Exchange(gradients_exchange(job), "direct"),
        Exchange(dead_letter_exchange(job), "fanout"),
    )
    queues = [Queue(dead_letter_queue(job), dead_letter_queue_arguments())]
    bindings = [Binding(dead_letter_exchange(job), dead_letter_queue(job), "")]
    for stage in stages:
        queues.append(Queue(forward_queue(job, stage), forward_queue_arguments(job), training=True))
        bindings.append(Binding(activations_exchange(job), forward_queue(job, stage), forward_binding(stage)))
    for party in parties:
        queues.append(Queue(reply_queue(job, party), reply_queue_arguments(job), training=True))
        bindings.append(Binding(gradients_exchange(job), reply_queue(job, party), reply_routing_key(party)))
    for name in serving:
        queues += [Queue(serve_queue(job, name), forward_queue_arguments(job)),
                   Queue(answer_queue(job, name), reply_queue_arguments(job))]
        bindings += [Binding(activations_exchange(job), serve_queue(job, name), forward_binding(serve_address(name))),
                     Binding(gradients_exchange(job), answer_queue(job, name), reply_routing_key(serve_address(name)))]
    return Layout(tuple(exchanges), tuple(queues), tuple(bindings))


def with_replicas(layout: Layout, replicas: int) -> Layout:
    """``layout`` with ``replicas`` replicas for each of its quorum queues (the job's ``replicas``)."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    queues = tuple(dataclasses.replace(q, arguments={**q.arguments, REPLICAS_ARGUMENT: replicas})
                   if q.arguments.get("x-queue-type") == "quorum" else q for q in layout.queues)
    return Layout(layout.exchanges, queues, layout.bindings)


#: Arguments only a quorum queue takes (RabbitMQ refuses them on a classic one).
_QUORUM_ONLY = (REPLICAS_ARGUMENT, "x-dead-letter-strategy", "x-delivery-limit")


def with_delivery(layout: Layout, delivery: str) -> Layout:
    """``layout`` for the job's ``delivery``: with ``transient``, its forward and reply queues (training
    traffic) are classic, in one node's memory: no replication, no delivery limit. The dead-letter
    queue and a served model's queues stay quorum whatever the delivery."""
    if delivery == "durable":
        return layout
    if delivery != "transient":
        raise ValueError(f"delivery must be durable or transient, got {delivery!r}")
    queues = tuple(dataclasses.replace(q, arguments={**{k: v for k, v in q.arguments.items() if k not in _QUORUM_ONLY},
                                                     "x-queue-type": "classic"}) if q.training else q
                   for q in layout.queues)
    return Layout(layout.exchanges, queues, layout.bindings)


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
