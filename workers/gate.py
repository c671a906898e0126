"""The one gate every delivery passes before a role sees it: size, then decode, then the envelope.

Size comes first so that a body too big to be any valid message of its queue is refused
before a byte of it is unpacked; then ``wire.decode``; then what no role should have to
check: the job, the kinds this queue takes, valid names to route replies by, the
broker-validated identity (``--require-identity``) and the routing key's sender. Content
checks that need a role's knowledge (cut shapes, membership) happen in the role.
Everything raises ``RejectedMessage(reason, detail)``: the loop dead-letters with the reason.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

from splitmq.shared import topology, validate, wire
from splitmq.shared.errors import DecodeError, RejectedMessage
from splitmq.shared.transport import Delivery
from splitmq.workers.roles.base import Inbound, Incoming, Source


@dataclass(frozen=True)
class GateRules:
    """What the gate checks beyond each queue's own limits."""

    job_id: str
    require_identity: bool = False
    #: Stages allowed to send forward messages on behalf of data owners (middle hops upstream of us).
    upstream: frozenset[str] = frozenset()
    #: Most batches one message may carry (the job's agreed ``coalesce``; 1: bundles are refused).
    coalesce: int = 1


def admit(delivery: Delivery, inbound: Inbound, rules: GateRules) -> Incoming:
    """Turn a delivery into an ``Incoming`` message for a role, or refuse it.

    Raises:
        RejectedMessage: with reason ``size``, ``decode``/``schema``/``kind``, ``job``, or ``identity``.
    """
    limit = inbound.limit()
    _check_size(delivery, inbound.queue, limit)
    return _envelope(delivery, _decode(delivery.body), inbound, rules)


def admit_all(delivery: Delivery, inbound: Inbound, rules: GateRules) -> Iterator[tuple[Delivery, Incoming]]:
    """``admit`` for a job that coalesces: a bundle gives one delivery per part, each admitted like a
    message of its own (its own size limit, decode and envelope); a part refused refuses the whole.

    The unread size limit scales with the agreed ``coalesce``; each part is held to one message's.
    Parts come one at a time (the caller keeps those admitted before a refusal: the first names the
    bundle in the sender's refusal).

    Raises:
        RejectedMessage: as ``admit``; ``size`` for a bundle of more batches than agreed.
    """
    if rules.coalesce <= 1:
        yield delivery, admit(delivery, inbound, rules)
        return
    limit = inbound.limit()
    _check_size(delivery, inbound.queue, limit * rules.coalesce)
    msg = _decode(delivery.body) if len(delivery.body) <= limit else _bundle_or_too_big(delivery, inbound.queue, limit)
    if not isinstance(msg, wire.Bundle):
        yield delivery, _envelope(delivery, msg, inbound, rules)
        return
    if not 1 <= len(msg.parts) <= rules.coalesce or msg.job_id != rules.job_id:
        raise RejectedMessage("size" if msg.job_id == rules.job_id else "job",
                              f"a bundle of {len(msg.parts)} batches for job {msg.job_id!r}; job "
                              f"{rules.job_id!r} agreed at most {rules.coalesce} per message")
    for cid, body in msg.parts:
        part = dataclasses.replace(delivery, body=body, message_id=cid, correlation_id=cid)
        _check_size(part, inbound.queue, limit)
        inc = _envelope(part, _decode(body), inbound, rules)
        if not isinstance(inc.msg, (wire.Forward, wire.Backward)):
            raise RejectedMessage("kind", f"a {inc.msg.kind.value} in a bundle, which carries forwards and answers")
        if inc.msg.client_id != msg.client_id:
            raise RejectedMessage("identity",
                                  f"a bundle for {msg.client_id!r} carries a batch of {inc.msg.client_id!r}")
        yield part, inc


def _bundle_or_too_big(delivery: Delivery, queue: str, limit: int) -> wire.Bundle:
    """A body over one message's limit is read only as a bundle: anything else, undecodable
    included, is refused as too big (what its sender must change), as without coalescing."""
    try:
        msg = wire.decode(delivery.body)
    except DecodeError:
        msg = None
    if not isinstance(msg, wire.Bundle):
        raise _too_big(delivery, queue, limit)
    return msg


def _check_size(delivery: Delivery, queue: str, limit: int) -> None:
    if len(delivery.body) > limit:
        raise _too_big(delivery, queue, limit)


def _too_big(delivery: Delivery, queue: str, limit: int) -> RejectedMessage:
    return RejectedMessage("size", f"body of {len(delivery.body)} bytes; {queue} takes at most {limit}")


def _decode(body: bytes) -> wire.AnyMessage:
    try:
        return wire.decode(body)
    except DecodeError as exc:
        raise RejectedMessage(validate.decode_reason(exc), str(exc)) from None


def _envelope(delivery: Delivery, msg: wire.AnyMessage, inbound: Inbound, rules: GateRules) -> Incoming:
    """The checks no role should have to make: kind, job, names, sender."""
    if msg.kind not in inbound.kinds:
        raise RejectedMessage("kind", f"a {msg.kind.value} message on {inbound.queue}, which takes "
                                      f"{sorted(k.value for k in inbound.kinds)}")
    if msg.job_id != rules.job_id:
        raise RejectedMessage("job", f"job {msg.job_id!r}, expected {rules.job_id!r}")
    reply_to = delivery.reply_to or ""
    _valid_name("client_id", msg.client_id)
    if reply_to:
        _valid_name("reply_to", reply_to)
    sender = topology.sender_of(delivery.routing_key) if inbound.source is Source.FORWARD else ""
    if inbound.source is Source.FORWARD:
        _check_sender(msg, sender, reply_to, delivery.user_id, rules)
    return Incoming(msg=msg, source=inbound.source, queue=inbound.queue, sender=sender, reply_to=reply_to,
                    correlation_id=delivery.correlation_id or delivery.message_id or "",
                    user_id=delivery.user_id, redelivered=delivery.redelivered)


def _valid_name(what: str, name: str) -> None:
    # Replies are routed by these names: a dot or wildcard must never reach a routing key.
    try:
        topology.check_name("client", name)
    except ValueError as exc:
        raise RejectedMessage("identity", f"{what}: {exc}") from None


def _check_sender(msg: wire.AnyMessage, sender: str, reply_to: str, user_id: str | None,
                  rules: GateRules) -> None:
    """A forward-queue message comes from the owner it names, or from a middle hop upstream of us."""
    if sender in rules.upstream:
        if reply_to and reply_to != sender:
            raise RejectedMessage("identity", f"stage {sender!r} asks for replies to {reply_to!r}")
        return  # a client's topic permission cannot write another sender's routing key
    if sender != msg.client_id:
        raise RejectedMessage("identity", f"routed as sent by {sender!r} but names client {msg.client_id!r}")
    if reply_to and reply_to != msg.client_id:
        raise RejectedMessage("identity", f"client {msg.client_id!r} asks for replies to {reply_to!r}")
    if rules.require_identity:
        if not user_id:
            raise RejectedMessage("identity", "message has no broker-validated user_id")
        if user_id != sender:
            raise RejectedMessage("identity", f"broker user {user_id!r} sent as {sender!r}")
