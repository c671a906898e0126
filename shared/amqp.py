"""Where the broker is, how to connect, and short-lived blocking operations on it.

``addresses`` and ``connection_parameters`` are shared by the long-lived transport
(``shared.broker``) and by the one-shot operations here, which open a blocking connection on
the caller's thread (to the first of the broker addresses that answers), do one thing and
close it: declare a job's topology, read a queue's depth, delete queues, take messages off a
queue (dead letters). Admin commands, ``splitmq status`` and tests use them; no party's hot
path does.
"""
from __future__ import annotations

import logging
import random
import re
import ssl
from typing import Any, Mapping, Sequence

import pika
import pika.exceptions
from splitmq.shared import defaults, topology
from splitmq.shared.errors import AccessRefused, BrokerError
from splitmq.shared.transport import Delivery

log = logging.getLogger(__name__)

#: The broker's refusal of a queue whose only difference is its replica count, and the count it has.
_REPLICAS_REFUSED = re.compile(r"inequivalent arg 'x-quorum-initial-group-size'.*but current is "
                               r"(?:the value '(\d+)'|'(\d+)'|none)")


def addresses(urls: str | Sequence[str]) -> list[str]:
    """Broker URLs from a comma- or space-separated string (``AMQP_URL``) or a list.

    Raises:
        ValueError: an empty list, or an entry without ``amqp://`` or ``amqps://``.
    """
    items = [u for part in ([urls] if isinstance(urls, str) else list(urls)) for u in part.replace(",", " ").split()]
    if not items:
        raise ValueError("no broker URL given (--amqp-url or AMQP_URL)")
    for u in items:
        if not u.startswith(("amqp://", "amqps://")):
            raise ValueError(f"broker URL {u!r} must start with amqp:// or amqps:// (e.g. amqp://localhost:5672)")
    return items


def connection_parameters(url: str, *, name: str, tls: Mapping[str, str] | None = None) -> pika.URLParameters:
    """pika parameters for ``url``; ``amqps://`` URLs verify the broker against ``tls['ca']``.

    ``tls`` keys: ``ca`` (CA bundle), ``cert`` and ``key`` (client certificate, optional),
    ``server_name`` (defaults to the URL's host).
    """
    params = pika.URLParameters(url)
    params.heartbeat = defaults.HEARTBEAT_S
    params.blocked_connection_timeout = 300
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.client_properties = {"connection_name": name}
    if url.startswith("amqps://"):
        tls = dict(tls or {})
        context = ssl.create_default_context(cafile=tls.get("ca") or None)
        if tls.get("cert"):
            context.load_cert_chain(tls["cert"], tls.get("key") or None)
        params.ssl_options = pika.SSLOptions(context, tls.get("server_name") or params.host)
    return params


def short(exc: BaseException) -> str:
    """An exception's text, cut to 200 characters (for one-line logs and errors)."""
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


def _blocking(urls: str | Sequence[str], tls: Mapping[str, str] | None = None) -> pika.BlockingConnection:
    """A blocking connection to the first broker address that answers, tried in a random order.

    A login refused by one address is tried on the others; refused by every address, it is final
    (``AccessRefused``). A handshake a node dropped is a failed connect, not a refusal.
    """
    errors: list[str] = []
    refused: list[str] = []
    listed = addresses(urls)
    for url in random.sample(listed, len(listed)):
        try:
            return pika.BlockingConnection(connection_parameters(url, name="splitmq-admin", tls=tls))
        except pika.exceptions.AMQPError as exc:
            (refused if login_refused(exc) else errors).append(f"{url.split('@')[-1]}: {short(exc)}")
    if refused and not errors:
        raise AccessRefused("the broker refused the login (" + "; ".join(refused) + ")")
    raise BrokerError("cannot connect to the broker (" + "; ".join(refused + errors) + ")")


def declare(urls: str | Sequence[str], layout: topology.Layout, tls: Mapping[str, str] | None = None) -> None:
    """Declare a layout's exchanges, queues and bindings (idempotent).

    Raises:
        AccessRefused: the user may not configure these names.
        BrokerError: unreachable broker, or an existing queue with other arguments.
    """
    conn = _blocking(urls, tls)
    try:
        ch = conn.channel()
        for ex in layout.exchanges:
            ch.exchange_declare(ex.name, ex.type, durable=True)
        for q in layout.queues:
            ch = _declare_queue(conn, ch, q)
        for b in layout.bindings:
            ch.queue_bind(b.queue, b.exchange, routing_key=b.routing_key)
    except pika.exceptions.ChannelClosedByBroker as exc:
        cls = AccessRefused if exc.reply_code == 403 else BrokerError
        raise cls(f"declaring the topology failed: {exc.reply_text}") from exc
    finally:
        if conn.is_open:
            conn.close()


def _declare_queue(conn: pika.BlockingConnection, ch: Any, q: topology.Queue) -> Any:
    """Declare ``q``; an existing queue that differs only in its replica count is taken as it is.

    The replica count matters only when a queue is created (``rabbitmq-queues grow`` and
    ``shrink`` change it later), and queues made before it was set, or with another value,
    must not stop a party. Returns the channel to go on with (a refusal closes the old one).
    """
    try:
        ch.queue_declare(q.name, durable=True, arguments=q.arguments)
        return ch
    except pika.exceptions.ChannelClosedByBroker as exc:
        found = _REPLICAS_REFUSED.search(exc.reply_text) if exc.reply_code == 406 else None
        if found is None:
            raise
    current = found.group(1) or found.group(2)
    log.warning("queue %s exists with %s replicas (%s), not %s; using it as it is", q.name,
                current or "the broker's default number of", topology.REPLICAS_ARGUMENT,
                q.arguments.get(topology.REPLICAS_ARGUMENT))
    arguments = {k: v for k, v in q.arguments.items() if k != topology.REPLICAS_ARGUMENT}
    if current:
        arguments[topology.REPLICAS_ARGUMENT] = int(current)
    ch = conn.channel()
    ch.queue_declare(q.name, durable=True, arguments=arguments)  # every other argument still checked
    return ch


def queue_depth(urls: str | Sequence[str], queue: str, tls: Mapping[str, str] | None = None) -> int:
    """Ready messages in ``queue`` (passive declare).

    Raises:
        BrokerError: the queue does not exist or the broker is unreachable.
    """
    conn = _blocking(urls, tls)
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise BrokerError(f"queue {queue!r}: {exc.reply_text}") from exc
    finally:
        if conn.is_open:
            conn.close()


def queue_exists(urls: str | Sequence[str], queue: str, tls: Mapping[str, str] | None = None) -> bool:
    """Whether ``queue`` exists (False too when the broker is unreachable)."""
    try:
        queue_depth(urls, queue, tls)
    except BrokerError:
        return False
    return True


def delete_queues(urls: str | Sequence[str], queues: list[str], tls: Mapping[str, str] | None = None) -> None:
    """Delete queues if they exist (tests and ``splitmq job delete``)."""
    conn = _blocking(urls, tls)
    try:
        for q in queues:
            conn.channel().queue_delete(q)
    finally:
        if conn.is_open:
            conn.close()


def get_messages(urls: str | Sequence[str], queue: str, limit: int = 1000,
                 tls: Mapping[str, str] | None = None) -> list[Delivery]:
    """Take up to ``limit`` messages off ``queue`` (acked): for inspecting dead letters."""
    conn = _blocking(urls, tls)
    out: list[Delivery] = []
    try:
        ch = conn.channel()
        while len(out) < limit:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                break
            out.append(Delivery(queue, body, method.delivery_tag, 0, method.redelivered, props.message_id,
                                props.correlation_id, props.reply_to, props.user_id, props.headers or {},
                                method.exchange, method.routing_key))
    finally:
        if conn.is_open:
            conn.close()
    return out


def login_refused(exc: BaseException) -> bool:
    """The broker refused our login or vhost (it said so: 403 ``ACCESS_REFUSED``, 530 ``NOT_ALLOWED``).

    pika reports a connection dropped during the handshake as a probable authentication error
    too; without the broker's own close it is a node that could not finish the handshake (in CI,
    one still booting after a kill closed it on ``handshake_timeout``): a failed connect.
    """
    return isinstance(exc, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError)) \
        and "ConnectionClosedByBroker" in repr(exc)


def fatal_connect_error(exc: BaseException, params: pika.URLParameters, *, only_chance: bool) -> BrokerError | None:
    """Why a failed connection attempt should end the party (a reason no retry fixes), or None to retry.
    A refused login (``AccessRefused``) is final for the caller only once every address refused it;
    a handshake the node dropped (pika calls it a probable authentication error too) is retried.

    ``only_chance``: the first attempt ever, with one address: a name that does not resolve then
    is a typo far more often than a DNS outage.
    """
    if login_refused(exc):
        return AccessRefused(f"the broker refused the login of {params.credentials.username!r}: "
                             "check the user name and password in --amqp-url")
    if "CERTIFICATE_VERIFY_FAILED" in repr(exc):  # pika wraps it in AMQPConnectionWorkflowFailed
        return BrokerError(f"TLS: the broker's certificate did not verify against the given CA: {exc!r}")
    if "gaierror" in repr(exc) and only_chance:
        return BrokerError(f"cannot resolve the broker host {params.host!r}: fix --amqp-url (or AMQP_URL)")
    return None
