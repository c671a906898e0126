"""RabbitMQ transport: one pika connection on its own I/O thread, safe to call from any thread.

pika is not thread-safe and sends heartbeats only while its loop runs, so every pika call
happens on the I/O thread; other threads hand work over with ``add_callback_threadsafe``.
Publishes are persistent, ``mandatory`` and confirmed; ``publish`` returns a Future that
resolves on the broker's confirm. Unconfirmed publishes survive a lost connection (the
outbox) and are sent again, with the same message id, after the reconnect; consumers
de-duplicate by message id. pika exceptions stay in this module: callers see
``shared.errors``.
"""
from __future__ import annotations

import collections
import logging
import random
import ssl
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from splitmq.shared import topology
from splitmq.shared.errors import AccessRefused, BrokerError, PublishNacked, Unroutable

log = logging.getLogger(__name__)

#: Reconnect backoff: first delay, cap (seconds); each delay is jittered down by up to half.
RECONNECT_BASE_S = 0.5
RECONNECT_CAP_S = 10.0
HEARTBEAT_S = 20
#: Channel-close codes that retrying cannot fix (missing queue/exchange, no permission).
_FATAL_CODES = {403: AccessRefused, 404: BrokerError, 406: BrokerError}


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


@dataclass
class _Outgoing:
    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    future: Future[None]


def connection_parameters(url: str, *, name: str, tls: Mapping[str, str] | None = None) -> pika.URLParameters:
    """pika parameters for ``url``; ``amqps://`` URLs verify the broker against ``tls['ca']``.

    ``tls`` keys: ``ca`` (CA bundle), ``cert`` and ``key`` (client certificate, optional),
    ``server_name`` (defaults to the URL's host).
    """
    params = pika.URLParameters(url)
    params.heartbeat = HEARTBEAT_S
    params.blocked_connection_timeout = 300
    params.connection_attempts = 1
    params.client_properties = {"connection_name": name}
    if url.startswith("amqps://"):
        tls = dict(tls or {})
        context = ssl.create_default_context(cafile=tls.get("ca") or None)
        if tls.get("cert"):
            context.load_cert_chain(tls["cert"], tls.get("key") or None)
        params.ssl_options = pika.SSLOptions(context, tls.get("server_name") or params.host)
    return params


class Broker:
    """A self-healing connection with one confirmed publishing channel and any consumers."""

    def __init__(self, url: str, *, name: str, prefetch: int = 16,
                 tls: Mapping[str, str] | None = None,
                 on_reconnect: Callable[[], None] | None = None) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self._params = connection_parameters(url, name=name, tls=tls)
        self._name = name
        self._prefetch = prefetch
        self._on_reconnect = on_reconnect
        self._ioloop = IOLoop()
        self._thread = threading.Thread(target=self._run, name=f"pika-{name}", daemon=True)
        self._conn: pika.SelectConnection | None = None
        self._chan: Any = None
        self._generation = 0
        self._attempt = 0
        self._consumers: list[tuple[str, Callable[[Delivery], None]]] = []
        self._unconfirmed: collections.OrderedDict[int, _Outgoing] = collections.OrderedDict()
        self._backlog: collections.deque[_Outgoing] = collections.deque()
        self._returned: set[str] = set()
        self._next_tag = 1
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._fatal: BrokerError | None = None
        self._closing = False
        self.connected_once = False

    # ---- public, thread-safe -------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Connect and wait until the channel is open.

        Raises:
            BrokerError: no connection within ``timeout``, or a fatal refusal (AccessRefused).
        """
        self._thread.start()
        self._ioloop.add_callback_threadsafe(self._connect)
        if not self._ready.wait(timeout):
            self._raise_if_fatal()
            self.close()
            raise BrokerError(f"no broker answered at {self._params.host}:{self._params.port} "
                              f"within {timeout:.0f}s (start it with deploy/broker.sh start)")
        self._raise_if_fatal()

    def consume(self, queue: str, handler: Callable[[Delivery], None]) -> None:
        """Deliver messages of ``queue`` to ``handler`` (called on the I/O thread: keep it short)."""
        def add() -> None:
            self._consumers.append((queue, handler))
            if self._chan is not None and self._chan.is_open:
                self._start_consumer(queue, handler)
        self._call(add)

    def publish(self, exchange: str, routing_key: str, body: bytes, *, message_id: str,
                correlation_id: str | None = None, reply_to: str | None = None,
                user_id: str | None = None, headers: Mapping[str, Any] | None = None,
                persistent: bool = True) -> Future[None]:
        """Queue a mandatory publish; the Future resolves when the broker confirms it.

        The Future fails with ``Unroutable`` (no queue bound), ``PublishNacked`` (queue full)
        or ``BrokerError`` (fatal refusal). A lost connection does not fail it: the message is
        sent again after the reconnect.
        """
        props = pika.BasicProperties(
            delivery_mode=2 if persistent else 1, message_id=message_id,
            correlation_id=correlation_id, reply_to=reply_to, user_id=user_id,
            headers=dict(headers or {}), content_type="application/msgpack",
        )
        out = _Outgoing(exchange, routing_key, body, props, Future())
        self._call(lambda: self._send(out))
        return out.future

    def ack(self, delivery: Delivery, *, multiple: bool = False) -> None:
        """Ack a delivery (and, with ``multiple``, all earlier ones on its channel)."""
        self._call(lambda: self._settle(delivery, lambda ch: ch.basic_ack(delivery.delivery_tag, multiple)))

    def reject(self, delivery: Delivery) -> None:
        """Reject without requeue: the queue dead-letters it."""
        self._call(lambda: self._settle(delivery, lambda ch: ch.basic_reject(delivery.delivery_tag, requeue=False)))

    def requeue(self, delivery: Delivery) -> None:
        """Return a delivery to its queue; quorum queues count it toward the delivery limit."""
        self._call(lambda: self._settle(delivery, lambda ch: ch.basic_nack(delivery.delivery_tag, requeue=True)))

    def close(self) -> None:
        """Close the connection and stop the I/O thread (unconfirmed publishes are failed)."""
        def stop() -> None:
            self._closing = True
            if self._conn is not None and self._conn.is_open:
                self._conn.close()
            else:
                self._ioloop.stop()
        if self._thread.is_alive():
            self._ioloop.add_callback_threadsafe(stop)
            self._thread.join(10)

    @property
    def is_connected(self) -> bool:
        return self._ready.is_set()

    def check(self) -> None:
        """Raise the fatal error that stopped this connection, if any."""
        self._raise_if_fatal()

    # ---- I/O thread ----------------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        self._raise_if_fatal()
        self._ioloop.add_callback_threadsafe(fn)

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    def _run(self) -> None:
        try:
            self._ioloop.start()
        finally:
            self._stopped.set()
            self._ready.clear()
            err = self._fatal or BrokerError(f"connection {self._name} closed")
            for out in [*self._unconfirmed.values(), *self._backlog]:
                if not out.future.done():
                    out.future.set_exception(err)

    def _connect(self) -> None:
        self._conn = pika.SelectConnection(
            self._params, on_open_callback=self._on_open, on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed, custom_ioloop=self._ioloop)

    def _on_open(self, conn: pika.SelectConnection) -> None:
        conn.channel(on_open_callback=self._on_channel_open)

    def _on_open_error(self, _conn: Any, exc: BaseException) -> None:
        if isinstance(exc, (pika.exceptions.ProbableAuthenticationError,
                            pika.exceptions.ProbableAccessDeniedError)):
            self._fail(AccessRefused(f"broker refused the login of {self._params.credentials.username!r}: {exc}"))
            return
        if "CERTIFICATE_VERIFY_FAILED" in repr(exc):  # pika wraps it in AMQPConnectionWorkflowFailed, no AMQPError
            self._fail(BrokerError(f"TLS: the broker's certificate did not verify against the given CA: {exc!r}"))
            return
        self._schedule_reconnect(f"connect failed: {exc!r}")

    def _on_closed(self, _conn: Any, exc: BaseException) -> None:
        self._lost()
        if self._closing or self._fatal is not None:
            self._ioloop.stop()
            return
        self._schedule_reconnect(f"connection lost: {exc!r}")

    def _schedule_reconnect(self, why: str) -> None:
        delay = min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2 ** self._attempt) * random.uniform(0.5, 1.0)
        self._attempt += 1
        log.warning("%s: %s; reconnecting in %.1fs (attempt %d)", self._name, why, delay, self._attempt)
        self._ioloop.call_later(delay, self._connect)

    def _lost(self) -> None:
        """The channel is gone: unconfirmed publishes go back to the head of the backlog."""
        self._ready.clear()
        self._chan = None
        self._generation += 1
        self._backlog.extendleft(reversed(list(self._unconfirmed.values())))
        self._unconfirmed.clear()

    def _on_channel_open(self, chan: Any) -> None:
        self._chan = chan
        self._next_tag = 1
        chan.add_on_close_callback(self._on_channel_closed)
        chan.add_on_return_callback(self._on_return)
        chan.add_on_cancel_callback(lambda frame: self._fail(BrokerError(f"consumer cancelled by the broker (queue deleted?): {frame}")))
        chan.confirm_delivery(self._on_confirm)
        chan.basic_qos(prefetch_count=self._prefetch)
        for queue, handler in self._consumers:
            self._start_consumer(queue, handler)
        if self.connected_once:
            log.warning("%s: reconnected; re-sending %d unconfirmed messages", self._name, len(self._backlog))
            if self._on_reconnect:
                self._on_reconnect()
        self.connected_once = True
        self._attempt = 0
        while self._backlog and self._chan is chan:
            self._send(self._backlog.popleft())
        self._ready.set()

    def _on_channel_closed(self, _chan: Any, exc: BaseException) -> None:
        code = getattr(exc, "reply_code", 0)
        if code in _FATAL_CODES and not self._closing:
            self._fail(_FATAL_CODES[code](f"broker closed the channel: {getattr(exc, 'reply_text', exc)}"))
            return
        if self._conn is not None and self._conn.is_open and not self._closing:
            self._lost()
            self._conn.channel(on_open_callback=self._on_channel_open)

    def _fail(self, err: BrokerError) -> None:
        log.error("%s: %s", self._name, err)
        self._fatal = err
        self._ready.set()  # wake start() so it can raise
        if self._conn is not None and self._conn.is_open:
            self._conn.close()
        else:
            self._ioloop.stop()

    def _start_consumer(self, queue: str, handler: Callable[[Delivery], None]) -> None:
        generation = self._generation

        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            delivery = Delivery(queue, body, method.delivery_tag, generation, method.redelivered,
                                props.message_id, props.correlation_id, props.reply_to,
                                props.user_id, props.headers or {})
            try:
                handler(delivery)
            except Exception:  # the handler must not kill the I/O thread
                log.exception("%s: handler for %s failed", self._name, queue)

        self._chan.basic_consume(queue, on_message, auto_ack=False)

    def _send(self, out: _Outgoing) -> None:
        if self._chan is None or not self._chan.is_open:
            self._backlog.append(out)
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
                out.future.set_exception(PublishNacked(f"broker nacked {mid} to {out.routing_key!r} (queue full?)"))
            elif mid in self._returned:
                self._returned.discard(mid)
                out.future.set_exception(Unroutable(f"no queue for {out.exchange!r} / {out.routing_key!r}"))
            else:
                out.future.set_result(None)

    def _settle(self, delivery: Delivery, fn: Callable[[Any], None]) -> None:
        # A tag from an earlier channel is meaningless now; the broker redelivers that message.
        if delivery.generation == self._generation and self._chan is not None and self._chan.is_open:
            fn(self._chan)


# ---- short-lived admin operations (blocking, caller's thread) ----------------------------

def _blocking(url: str, tls: Mapping[str, str] | None = None) -> pika.BlockingConnection:
    try:
        return pika.BlockingConnection(connection_parameters(url, name="splitmq-admin", tls=tls))
    except pika.exceptions.ProbableAuthenticationError as exc:
        raise AccessRefused(f"broker refused the login: {exc}") from exc
    except pika.exceptions.AMQPError as exc:
        raise BrokerError(f"cannot connect to the broker at {url.split('@')[-1]}: {exc!r}") from exc


def declare(url: str, layout: topology.Layout, tls: Mapping[str, str] | None = None) -> None:
    """Declare a layout's exchanges, queues and bindings (idempotent).

    Raises:
        AccessRefused: the user may not configure these names.
        BrokerError: unreachable broker, or an existing queue with other arguments.
    """
    conn = _blocking(url, tls)
    try:
        ch = conn.channel()
        for ex in layout.exchanges:
            ch.exchange_declare(ex.name, ex.type, durable=True)
        for q in layout.queues:
            ch.queue_declare(q.name, durable=True, arguments=q.arguments)
        for b in layout.bindings:
            ch.queue_bind(b.queue, b.exchange, routing_key=b.routing_key)
    except pika.exceptions.ChannelClosedByBroker as exc:
        cls = AccessRefused if exc.reply_code == 403 else BrokerError
        raise cls(f"declaring the topology failed: {exc.reply_text}") from exc
    finally:
        if conn.is_open:
            conn.close()


def queue_depth(url: str, queue: str, tls: Mapping[str, str] | None = None) -> int:
    """Ready messages in ``queue`` (passive declare).

    Raises:
        BrokerError: the queue does not exist or the broker is unreachable.
    """
    conn = _blocking(url, tls)
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise BrokerError(f"queue {queue!r}: {exc.reply_text}") from exc
    finally:
        if conn.is_open:
            conn.close()


def delete_queues(url: str, queues: list[str], tls: Mapping[str, str] | None = None) -> None:
    """Delete queues if they exist (tests and ``broker reset``)."""
    conn = _blocking(url, tls)
    try:
        for q in queues:
            conn.channel().queue_delete(q)
    finally:
        if conn.is_open:
            conn.close()


def get_messages(url: str, queue: str, limit: int = 1000, tls: Mapping[str, str] | None = None) -> list[Delivery]:
    """Take up to ``limit`` messages off ``queue`` (acked): for inspecting dead letters."""
    conn = _blocking(url, tls)
    out: list[Delivery] = []
    try:
        ch = conn.channel()
        while len(out) < limit:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                break
            out.append(Delivery(queue, body, method.delivery_tag, 0, method.redelivered, props.message_id,
                                props.correlation_id, props.reply_to, props.user_id, props.headers or {}))
    finally:
        if conn.is_open:
            conn.close()
    return out
