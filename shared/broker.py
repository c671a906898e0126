"""RabbitMQ transport: one pika connection on its own I/O thread, safe to call from any thread.

pika is not thread-safe and sends heartbeats only while its loop runs, so every pika call
happens on the I/O thread; other threads hand work over with ``add_callback_threadsafe``.
Publishes are persistent, ``mandatory`` and confirmed; ``publish`` returns a Future that
resolves on the broker's confirm. Unconfirmed publishes survive a lost connection (the
outbox) and are sent again, with the same message id, after the reconnect; a nacked one is
sent again after a short backoff (a quorum queue nacks for ~0.3 s after its leader node
dies) until ``NACK_RETRY_S`` of refusals make it final. The connection is made, and remade,
over every address given (``shared.rotation``), with capped, jittered backoff, logged. A
``lease`` (an exclusive, auto-deleted queue) makes sure only one party of a name runs at a time.
A resource alarm blocking our publishes is told (``blocked``). Callers see ``shared.errors``, not pika's.
"""
from __future__ import annotations

import collections
import logging
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from splitmq.shared import defaults, io_tuning, topology
from splitmq.shared.amqp import addresses, connection_parameters, declare, fatal_connect_error, queue_exists, short
from splitmq.shared.errors import AccessRefused, BrokerError, PublishNacked, Unroutable
from splitmq.shared.rotation import Rotation
from splitmq.shared.transport import Delivery, Handler, ack_plan

log = logging.getLogger(__name__)
io_tuning.tune_receive()  # pika's 4 KB socket reads copy each message quadratically (see io_tuning)

#: Channel-close codes that retrying cannot fix (no permission, missing queue, bad arguments).
_FATAL_CODES = {403: AccessRefused, 404: BrokerError, 406: BrokerError}
_RESOURCE_LOCKED = 405


@dataclass
class _Outgoing:
    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    future: Future[None]
    first_nack: float | None = None


class Broker:
    """A self-healing connection with one confirmed publishing channel and any consumers."""

    def __init__(self, urls: str | Sequence[str], *, name: str, prefetch: int = 16,
                 tls: Mapping[str, str] | None = None, lease: str | None = None,
                 on_reconnect: Callable[[], None] | None = None) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self._urls, self._tls = addresses(urls), dict(tls or {})
        self._nodes = Rotation([connection_parameters(u, name=name, tls=tls) for u in self._urls])
        self._name, self._prefetch, self._lease, self._on_reconnect = name, prefetch, lease, on_reconnect
        self._ioloop = IOLoop()
        self._thread = threading.Thread(target=self._run, name=f"pika-{name}", daemon=True)
        self._conn: pika.SelectConnection | None = None
        self._chan: Any = None
        self._publishing: Any = None  # the channel once set up (lease held, consumers started)
        self._generation, self._attempt, self._next_tag = 0, 0, 1
        self._consumers: list[tuple[str, Handler]] = []
        self._unconfirmed: collections.OrderedDict[int, _Outgoing] = collections.OrderedDict()
        self._backlog: collections.deque[_Outgoing] = collections.deque()
        self._returned: set[str] = set()
        self._unsettled: set[int] = set()  # delivery tags of the current channel not yet acked or rejected
        self._ready = threading.Event()
        self._fatal: BrokerError | None = None
        self._closing, self._last_error = False, ""
        self._lease_refused: str | None = None
        self.connected_once = False
        self._opened_at = 0.0  # when the channel was last ready (monotonic)
        self._blocked: str | None = None  # the broker's reason while it blocks our publishes

    # ---- public, thread-safe -------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background (and re-connecting whenever the connection drops)."""
        self._thread.start()
        self._ioloop.add_callback_threadsafe(self._connect)

    def wait_ready(self, timeout: float) -> None:
        """Block until connected (for short-lived tools and tests).

        Raises:
            BrokerError: not connected within ``timeout``, or a fatal refusal.
        """
        if not self._ready.wait(timeout):
            self._raise_if_fatal()
            raise BrokerError(f"no broker answered within {timeout:.0f}s: {self.status()}")
        self._raise_if_fatal()

    @property
    def is_connected(self) -> bool:
        return self._ready.is_set() and self._fatal is None

    def status(self) -> str:
        where = _where(self._nodes.current)
        if self.is_connected:
            return f"connected to {where}"
        if self._lease_refused:
            return self._lease_refused
        return f"connecting to {where}" + (f"; last error: {self._last_error}" if self._last_error else "")

    def lease_refused(self) -> str | None:
        return self._lease_refused

    def blocked(self) -> str | None:
        return self._blocked

    def check(self) -> None:
        """Raise the fatal error that stopped this connection, if any."""
        self._raise_if_fatal()

    def consume(self, queue: str, handler: Handler) -> None:
        """Deliver messages of ``queue`` to ``handler`` (called on the I/O thread: keep it short)."""
        def add() -> None:
            self._consumers.append((queue, handler))
            if self._ready.is_set() and self._chan is not None and self._chan.is_open:
                self._start_consumer(queue, handler)
        self._call(add)

    def publish(self, exchange: str, routing_key: str, body: bytes, *, message_id: str,
                correlation_id: str | None = None, reply_to: str | None = None, user_id: str | None = None,
                headers: Mapping[str, Any] | None = None, persistent: bool = True) -> Future[None]:
        """Queue a mandatory publish, persistent unless told; the Future resolves when the broker confirms it.

        The Future fails with ``Unroutable`` (no queue bound), ``PublishNacked`` (refused for
        ``NACK_RETRY_S``) or ``BrokerError`` (fatal refusal). A lost connection does not fail
        it: the message is sent again after the reconnect.
        """
        props = pika.BasicProperties(
            delivery_mode=2 if persistent else 1, message_id=message_id, correlation_id=correlation_id,
            reply_to=reply_to, user_id=user_id, headers=dict(headers or {}), content_type="application/msgpack")
        out = _Outgoing(exchange, routing_key, body, props, Future())
        self._call(lambda: self._send(out))
        return out.future

    def ack(self, delivery: Delivery) -> None:
        self._call(lambda: self._settle(delivery, lambda ch: ch.basic_ack(delivery.delivery_tag)))

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack these, a run of contiguous tags from the channel's lowest unsettled one in one multiple ack."""
        if deliveries:
            self._call(lambda: self._ack_many(deliveries))

    def reject(self, delivery: Delivery) -> None:
        """Reject without requeue: the queue dead-letters it."""
        self._call(lambda: self._settle(delivery, lambda ch: ch.basic_reject(delivery.delivery_tag, requeue=False)))

    def declare(self, layout: topology.Layout) -> None:
        declare(self._urls, layout, self._tls)

    def queue_exists(self, queue: str) -> bool:
        return queue_exists(self._urls, queue, self._tls)

    def close(self) -> None:
        """Close the connection and stop the I/O thread (unconfirmed publishes are failed)."""
        def stop() -> None:
            self._closing = True
            (self._conn.close if self._conn is not None and self._conn.is_open else self._ioloop.stop)()
        if self._thread.is_alive():
            self._ioloop.add_callback_threadsafe(stop)
            self._thread.join(10)

    # ---- I/O thread: connecting ------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        self._raise_if_fatal()
        self._ioloop.add_callback_threadsafe(fn)

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    def _run(self) -> None:
        io_tuning.name_thread(f"pika-{self._name}")
        try:
            self._ioloop.start()
        finally:
            self._ready.clear()
            err = self._fatal or BrokerError(f"connection {self._name} closed")
            for out in [*self._unconfirmed.values(), *self._backlog]:
                if not out.future.done():
                    out.future.set_exception(err)

    def _connect(self) -> None:
        self._conn = pika.SelectConnection(
            self._nodes.next(), on_open_callback=self._on_open, on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed, custom_ioloop=self._ioloop)

    def _on_open(self, conn: pika.SelectConnection) -> None:
        conn.add_on_connection_blocked_callback(self._on_blocked)
        conn.add_on_connection_unblocked_callback(self._on_unblocked)
        conn.channel(on_open_callback=self._on_channel_open)

    def _on_blocked(self, _conn: Any, frame: Any) -> None:
        """A resource alarm: no publish of ours is read until it clears (told, or seen in a confirm)."""
        self._blocked = f"{getattr(frame.method, 'reason', '') or 'a resource alarm'} on a node"
        log.warning("%s: the broker blocks our publishes: %s; waiting for it to clear", self._name, self._blocked)

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        if self._blocked is not None:
            log.warning("%s: the broker takes our publishes again (%s cleared)", self._name, self._blocked)
        self._blocked = None

    def _on_open_error(self, _conn: Any, exc: BaseException) -> None:
        fatal = fatal_connect_error(exc, self._nodes.current,
                                    only_chance=not self.connected_once and len(self._nodes.addresses) == 1)
        if isinstance(fatal, AccessRefused) and not self._nodes.login_refused():
            fatal = None  # a cluster node still booting refuses users the others accept
        if fatal is not None:
            self._fail(fatal)
            return
        self._schedule_reconnect(f"cannot connect to {_where(self._nodes.current)}: {short(exc)}")

    def _on_closed(self, _conn: Any, exc: BaseException) -> None:
        self._lost()
        if self._closing or self._fatal is not None:
            self._ioloop.stop()
            return
        self._nodes.lost()
        self._schedule_reconnect(f"connection to {_where(self._nodes.current)} lost: {short(exc)}")

    def _schedule_reconnect(self, why: str) -> None:
        """The next address of this round at once; after a whole round failed, capped, jittered backoff."""
        self._last_error = why
        nxt = self._nodes.peek()
        if nxt is not None:
            log.warning("%s: %s; trying %s", self._name, why, _where(nxt))
            self._ioloop.call_later(defaults.NEXT_ADDRESS_S, self._connect)
            return
        delay = min(defaults.RECONNECT_CAP_S, defaults.RECONNECT_BASE_S * 2 ** self._attempt) * random.uniform(0.5, 1)
        self._attempt += 1
        log.warning("%s: %s; trying again in %.1fs (attempt %d)", self._name, why, delay, self._attempt)
        self._ioloop.call_later(delay, self._connect)

    def _lost(self) -> None:
        """The channel is gone: unconfirmed publishes go back to the head of the backlog."""
        self._ready.clear()
        self._chan = self._publishing = None
        self._generation += 1
        self._unsettled = set()
        self._backlog.extendleft(reversed(list(self._unconfirmed.values())))
        self._unconfirmed.clear()

    def _on_channel_open(self, chan: Any) -> None:
        self._chan = chan
        self._next_tag = 1
        chan.add_on_close_callback(self._on_channel_closed)
        chan.add_on_return_callback(self._on_return)
        chan.add_on_cancel_callback(lambda frame: self._fail(BrokerError(
            f"the broker cancelled our consumer (was a queue deleted?): {frame}")))
        chan.confirm_delivery(self._on_confirm)
        chan.basic_qos(prefetch_count=self._prefetch)
        if self._lease is None:
            self._on_lease(chan)
        else:
            chan.queue_declare(self._lease, exclusive=True, auto_delete=True,
                               callback=lambda _frame: self._on_lease(chan))

    def _on_lease(self, chan: Any) -> None:
        self._lease_refused = None
        for queue, handler in self._consumers:
            self._start_consumer(queue, handler)
        if self.connected_once:
            log.warning("%s: reconnected to %s; re-sending %d unconfirmed messages", self._name,
                        _where(self._nodes.current), len(self._backlog))
            if self._on_reconnect:
                self._on_reconnect()
        self.connected_once = True
        self._nodes.ready()
        self._opened_at = time.monotonic()
        self._attempt, self._last_error = 0, ""
        self._publishing = chan
        backlog, self._backlog = self._backlog, collections.deque()
        for out in backlog:
            self._send(out)
        self._ready.set()

    def _on_channel_closed(self, _chan: Any, exc: BaseException) -> None:
        code = getattr(exc, "reply_code", 0)
        text = getattr(exc, "reply_text", str(exc))
        if code == _RESOURCE_LOCKED and not self._closing:
            self._lease_refused = (f"another connection holds {self._lease!r}: another party named "
                                   f"{self._name!r} is running (or the broker has not yet noticed that an "
                                   "earlier one died)")
        elif code in _FATAL_CODES and not self._closing:
            self._fail(_FATAL_CODES[code](f"the broker closed our channel: {text}"))
            return
        if self._conn is not None and self._conn.is_open and not self._closing:
            self._lost()
            delay = 1.0 if code == _RESOURCE_LOCKED else 0.0
            self._ioloop.call_later(delay, lambda: self._reopen_channel())

    def _reopen_channel(self) -> None:
        if self._conn is not None and self._conn.is_open and not self._closing:
            self._conn.channel(on_open_callback=self._on_channel_open)

    def _fail(self, err: BrokerError) -> None:
        log.error("%s: %s", self._name, err)
        self._fatal = err
        self._ready.set()  # wake waiters so they can raise
        if self._conn is not None and self._conn.is_open:
            self._conn.close()
        else:
            self._ioloop.stop()

    # ---- I/O thread: messages --------------------------------------------------------------

    def _start_consumer(self, queue: str, handler: Handler) -> None:
        generation = self._generation

        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            delivery = Delivery(queue, body, method.delivery_tag, generation, method.redelivered,
                                props.message_id, props.correlation_id, props.reply_to,
                                props.user_id, props.headers or {}, method.exchange, method.routing_key)
            self._unsettled.add(method.delivery_tag)
            try:
                handler(delivery)
            except Exception:  # the handler must not kill the I/O thread
                log.exception("%s: handler for %s failed", self._name, queue)

        self._chan.basic_consume(queue, on_message, auto_ack=False)

    def _send(self, out: _Outgoing) -> None:
        if self._publishing is None or self._publishing is not self._chan or not self._chan.is_open:
            self._backlog.append(out)  # sent, in order, once the channel is set up again
            return
        self._chan.basic_publish(out.exchange, out.routing_key, out.body, out.properties, mandatory=True)
        self._unconfirmed[self._next_tag] = out
        self._next_tag += 1

    def _on_return(self, _ch: Any, _method: Any, props: Any, _body: bytes) -> None:
        if props.message_id:
            self._returned.add(props.message_id)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        nack = isinstance(method, pika.spec.Basic.Nack)
        tags = [t for t in self._unconfirmed if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            out = self._unconfirmed.pop(tag, None)
            if out is None or out.future.done():
                continue
            mid = out.properties.message_id
            if nack:
                self._nacked(out)
            elif mid in self._returned:
                self._returned.discard(mid)
                out.future.set_exception(Unroutable(f"no queue for {out.exchange!r} / {out.routing_key!r}"))
            else:
                out.future.set_result(None)
                if self._blocked is not None:  # publishes get through: whatever blocked them has cleared
                    self._on_unblocked(None, None)

    def _nacked(self, out: _Outgoing) -> None:
        """A nack is a reason to publish again (a queue's leader moving), until it has lasted too long."""
        now = time.monotonic()
        out.first_nack = out.first_nack or now
        if now - out.first_nack > defaults.NACK_RETRY_S:
            out.future.set_exception(PublishNacked(
                f"the broker refused {out.properties.message_id} to {out.routing_key!r} for "
                f"{defaults.NACK_RETRY_S:.0f}s (queue full, or no quorum for it)"))
            return
        log.info("%s: the broker nacked %s; publishing it again", self._name, out.properties.message_id)
        self._ioloop.call_later(random.uniform(0.1, 0.3), lambda: self._send(out))
        if now - max(out.first_nack, self._opened_at) > defaults.NACK_MOVE_S and self._conn is not None \
                and self._conn.is_open:
            log.warning("%s: %s nacked for %.0fs through %s; moving to another node", self._name,
                        out.properties.message_id, now - out.first_nack, _where(self._nodes.current))
            self._opened_at = now  # once per connection
            self._conn.close(reply_text="publishes refused for long: moving to another node")

    def _settle(self, delivery: Delivery, fn: Callable[[Any], None]) -> None:
        # A tag from an earlier channel is meaningless now; the broker redelivers that message.
        if delivery.generation == self._generation and self._chan is not None and self._chan.is_open:
            fn(self._chan)
            self._unsettled.discard(delivery.delivery_tag)

    def _ack_many(self, deliveries: Sequence[Delivery]) -> None:
        tags = {d.delivery_tag for d in deliveries if d.generation == self._generation}  # never across channels
        if tags and self._chan is not None and self._chan.is_open:
            upto, singles = ack_plan(self._unsettled, tags)
            if upto is not None:
                self._chan.basic_ack(upto, multiple=True)
            for tag in singles:
                self._chan.basic_ack(tag)
            self._unsettled -= tags


def _where(params: pika.URLParameters) -> str:
    return f"{params.host}:{params.port}"
