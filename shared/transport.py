"""What the party loop needs from a message broker, and an in-memory broker that provides it.

``Transport`` is the interface; ``shared.broker.Broker`` implements it over RabbitMQ, and
``StubBroker.connect()`` gives an in-memory one for fast tests of the loop and the roles
(Dramatiq's StubBroker, nameko's worker_factory). The stub routes like RabbitMQ (topic,
direct and fanout exchanges, mandatory returns, dead-lettering on reject, redelivery of
unacked messages when a connection closes) but knows nothing of persistence or other
processes: a test that claims the pipeline works runs on the real broker.
"""
from __future__ import annotations

import collections
import itertools
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import AbstractSet as Set, Any, Callable, Iterable, Mapping, Protocol, Sequence

from splitmq.shared import topology
from splitmq.shared.errors import BrokerError, Unroutable


@dataclass(frozen=True)
class Delivery:
    """One consumed message. ``generation`` ties its delivery tag to the channel it came on."""

    queue: str
    body: bytes
    delivery_tag: int
    generation: int
    redelivered: bool
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    user_id: str | None
    headers: Mapping[str, Any] = field(default_factory=dict)
    exchange: str = ""
    routing_key: str = ""


Handler = Callable[[Delivery], None]


class Transport(Protocol):
    """A connection to the broker: confirmed publishes, manual-ack consumers, declarations."""

    @property
    def is_connected(self) -> bool: ...

    def start(self) -> None:
        """Begin connecting (and re-connecting, with backoff) in the background."""

    def status(self) -> str:
        """One line on the connection: connected, or the last failure and the next attempt."""

    def check(self) -> None:
        """Raise the fatal ``BrokerError`` that stopped this connection, if any."""

    def lease_refused(self) -> str | None:
        """Why this connection cannot take its lease (another party of its name holds it), or None."""

    def blocked(self) -> str | None:
        """Why the broker blocks our publishes (a resource alarm: memory or disk on a node), or None."""

    def consume(self, queue: str, handler: Handler) -> None:
        """Deliver ``queue``'s messages to ``handler`` (on the transport's thread: keep it short)."""

    def publish(self, exchange: str, routing_key: str, body: bytes, *, message_id: str,
                correlation_id: str | None = None, reply_to: str | None = None,
                user_id: str | None = None, headers: Mapping[str, Any] | None = None,
                persistent: bool = True) -> Future[None]:
        """A mandatory publish, persistent unless asked (``delivery = transient``); the Future resolves on the
        broker's confirm."""

    def ack(self, delivery: Delivery) -> None: ...

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack these; contiguous delivery tags of one channel may go in one multiple ack (``ack_plan``)."""

    def reject(self, delivery: Delivery) -> None:
        """Reject without requeue: the queue dead-letters it."""

    def declare(self, layout: topology.Layout) -> None:
        """Declare exchanges, queues and bindings (idempotent); raises AccessRefused without rights."""

    def queue_exists(self, queue: str) -> bool: ...

    def close(self) -> None: ...


def ack_plan(unsettled: Iterable[int], tags: Set[int]) -> tuple[int | None, list[int]]:
    """How to ack ``tags`` of one channel: ``(upto, singles)``, ``upto`` for one ``basic_ack(multiple=True)``.

    A multiple ack settles *every* unsettled tag up to it, so it may only cover a run that starts
    at the lowest tag still unsettled on the channel (``unsettled``: all of them, ours included)
    and holds only tags we ack; the rest are acked one by one. Tags are per channel: the caller
    passes only tags of the current one.
    """
    pending, run = sorted(unsettled), 0
    while run < len(pending) and pending[run] in tags:
        run += 1
    if run < 2:
        return None, sorted(tags)
    covered = set(pending[:run])
    return pending[run - 1], sorted(t for t in tags if t not in covered)


# ---- the in-memory broker -------------------------------------------------------------------

@dataclass
class _Message:
    exchange: str
    routing_key: str
    body: bytes
    props: dict[str, Any]
    redelivered: bool = False


@dataclass
class _Queue:
    name: str
    arguments: dict[str, Any]
    ready: collections.deque[_Message] = field(default_factory=collections.deque)
    consumers: list[tuple["StubTransport", Handler]] = field(default_factory=list)


def _topic_match(pattern: str, key: str) -> bool:
    regex = "^" + re.escape(pattern).replace(r"\*", r"[^.]+").replace(r"\#", r".*") + "$"
    return re.match(regex, key) is not None


class StubBroker:
    """An in-memory broker shared by the ``StubTransport`` connections of one test."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.exchanges: dict[str, str] = {}
        self.queues: dict[str, _Queue] = {}
        self.bindings: list[topology.Binding] = []
        self.leases: dict[str, StubTransport] = {}
        self._tags = itertools.count(1)
        #: A test's broker restart: a non-persistent publish for which this says True is confirmed,
        #: then lost (what a real restart loses of a transient job's batches and answers).
        self.lose: Callable[[str, str, bytes], bool] | None = None

    def connect(self, name: str = "stub", lease: str | None = None) -> "StubTransport":
        return StubTransport(self, name, lease)

    def declare(self, layout: topology.Layout) -> None:
        with self.lock:
            for ex in layout.exchanges:
                self.exchanges.setdefault(ex.name, ex.type)
            for q in layout.queues:
                self.queues.setdefault(q.name, _Queue(q.name, dict(q.arguments)))
            for b in layout.bindings:
                if b not in self.bindings:
                    self.bindings.append(b)

    def messages(self, queue: str) -> list[bytes]:
        """Bodies waiting in ``queue`` (for assertions)."""
        with self.lock:
            return [m.body for m in self.queues[queue].ready]

    def route(self, msg: _Message) -> bool:
        """Put ``msg`` into every bound queue; False if none matched (a mandatory return)."""
        kind = self.exchanges.get(msg.exchange)
        if kind is None:
            raise BrokerError(f"no exchange {msg.exchange!r}")
        matched = False
        for b in self.bindings:
            if b.exchange != msg.exchange:
                continue
            if kind == "fanout" or (kind == "direct" and b.routing_key == msg.routing_key) or (
                    kind == "topic" and _topic_match(b.routing_key, msg.routing_key)):
                self.queues[b.queue].ready.append(_Message(msg.exchange, msg.routing_key, msg.body, dict(msg.props)))
                matched = True
                self.pump(b.queue)
        return matched

    def pump(self, queue: str) -> None:
        """Hand ready messages to the queue's active consumer (the first one: single-active)."""
        q = self.queues[queue]
        while q.ready and q.consumers:
            conn, handler = q.consumers[0]
            msg = q.ready.popleft()
            tag = next(self._tags)
            conn.unacked[tag] = (queue, msg)
            p = msg.props
            handler(Delivery(queue, msg.body, tag, 0, msg.redelivered, p.get("message_id"),
                             p.get("correlation_id"), p.get("reply_to"), p.get("user_id"),
                             p.get("headers") or {}, msg.exchange, msg.routing_key))

    def dead_letter(self, queue: str, msg: _Message, reason: str) -> None:
        dlx = self.queues[queue].arguments.get("x-dead-letter-exchange")
        if dlx:
            headers = dict(msg.props.get("headers") or {})
            headers["x-death"] = [{"reason": reason, "queue": queue}]
            self.route(_Message(dlx, msg.routing_key, msg.body, {**msg.props, "headers": headers}))


class StubTransport:
    """One connection to a ``StubBroker``: the ``Transport`` interface, synchronous and in memory."""

    def __init__(self, broker: StubBroker, name: str, lease: str | None = None) -> None:
        self.broker, self.name, self.lease = broker, name, lease
        self.unacked: dict[int, tuple[str, _Message]] = {}
        self.connected = self.closed = False
        self._refused: str | None = None
        #: Set to make every later publish fail with this error (a broker nack, say).
        self.fail_publishes: Exception | None = None
        #: Set to what the broker says while it blocks our publishes (a resource alarm).
        self.blocked_by: str | None = None

    @property
    def is_connected(self) -> bool:
        return self.connected

    def start(self) -> None:
        """Connected at once, unless another connection holds our lease (then: not connected)."""
        with self.broker.lock:
            holder = self.broker.leases.get(self.lease) if self.lease else None
            if holder is not None and holder is not self and holder.connected:
                self._refused = f"another connection holds {self.lease!r}: another party named {self.name!r} is running"
                return
            if self.lease:
                self.broker.leases[self.lease] = self
            self.connected = True

    def status(self) -> str:
        return "connected" if self.connected else (self._refused or "closed")

    def check(self) -> None:
        if self.closed:
            raise BrokerError(f"{self.name}: connection closed")

    def consume(self, queue: str, handler: Handler) -> None:
        with self.broker.lock:
            self.broker.queues[queue].consumers.append((self, handler))
            self.broker.pump(queue)

    def blocked(self) -> str | None:
        return self.blocked_by

    def lease_refused(self) -> str | None:
        if not self.connected and self._refused:
            self.start()  # the real broker retries on its own
        return None if self.connected else self._refused

    def publish(self, exchange: str, routing_key: str, body: bytes, *, message_id: str,
                correlation_id: str | None = None, reply_to: str | None = None,
                user_id: str | None = None, headers: Mapping[str, Any] | None = None,
                persistent: bool = True) -> Future[None]:
        future: Future[None] = Future()
        props = {"message_id": message_id, "correlation_id": correlation_id, "reply_to": reply_to,
                 "user_id": user_id, "headers": dict(headers or {}), "persistent": persistent}
        if self.fail_publishes is not None:
            future.set_exception(self.fail_publishes)
            return future
        if not persistent and self.broker.lose is not None and self.broker.lose(exchange, routing_key, body):
            future.set_result(None)
            return future
        with self.broker.lock:
            routed = self.broker.route(_Message(exchange, routing_key, body, props))
        if routed:
            future.set_result(None)
        else:
            future.set_exception(Unroutable(f"no queue for {exchange!r} / {routing_key!r}"))
        return future

    def ack(self, delivery: Delivery) -> None:
        with self.broker.lock:
            self.unacked.pop(delivery.delivery_tag, None)

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            self.ack(d)

    def reject(self, delivery: Delivery) -> None:
        with self.broker.lock:
            entry = self.unacked.pop(delivery.delivery_tag, None)
            if entry is not None:
                self.broker.dead_letter(entry[0], entry[1], "rejected")

    def declare(self, layout: topology.Layout) -> None:
        self.broker.declare(layout)

    def queue_exists(self, queue: str) -> bool:
        return queue in self.broker.queues

    def close(self) -> None:
        """Like a dropped connection: unacked messages go back to the head of their queues."""
        with self.broker.lock:
            self.connected, self.closed = False, True
            for q in self.broker.queues.values():
                q.consumers = [(c, h) for c, h in q.consumers if c is not self]
            if self.lease and self.broker.leases.get(self.lease) is self:
                del self.broker.leases[self.lease]
            for _tag, (queue, msg) in sorted(self.unacked.items(), reverse=True):
                msg.redelivered = True
                self.broker.queues[queue].ready.appendleft(msg)
            self.unacked.clear()
            for name in list(self.broker.queues):
                self.broker.pump(name)
