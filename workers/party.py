"""The party loop: the one place that moves messages between the broker and the roles.

Every splitmq process runs one ``Party``. It owns the transport (pika stays on its own
thread; deliveries cross over through an inbox), the gate (size, decode, envelope),
exact per-client dedupe (``shared.ledger``), dead-lettering with a reason, retries of a
failing handler, acks after confirm and checkpoint, timers and waits, and the named exit.
Roles (``splitmq.workers.roles``) do the model work: a message in, messages out.

A data path reads in one direction: batch -> bottom role -> loop -> broker -> loop -> top
role -> loop -> broker -> loop -> bottom role.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import queue
import time
from typing import Any, Callable, Sequence

from splitmq.shared import codec, defaults, wire
from splitmq.shared.errors import AccessRefused, BrokerError, RejectedMessage
from splitmq.shared.transport import Delivery, Transport
from splitmq.workers import gate, role_state
from splitmq.workers.acks import Acks
from splitmq.workers.answers import Answers
from splitmq.workers.exits import ExitReason, Outages, PartyExit, Wait, WaitLog
from splitmq.workers.held import Retries, Unjoined
from splitmq.workers.outbox import Outbox
from splitmq.workers.party_options import LoopOptions as LoopOptions, Outcome as Outcome  # re-exported
from splitmq.workers.roles.base import Incoming, Role, Send, Source, Step, ToParty, batch_key, routing
from splitmq.workers.stats import Stats

log = logging.getLogger(__name__)
#: What the user can do while the broker blocks our publishes (a resource alarm).
_ALARM_HINT = ("free memory or disk on the broker node (`rabbitmq-diagnostics alarms` names it); the party resumes "
               "where it was when restarted")


class Party:
    """Runs roles against a transport until one of them, a wait, a signal or a fault ends it."""

    def __init__(self, roles: Sequence[Role], transport: Transport, opts: LoopOptions, *,
                 stats: Stats, stop: Callable[[], bool] = lambda: False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.roles, self.transport, self.opts, self.stats = list(roles), transport, opts, stats
        self.stop, self.clock = stop, clock
        most = int(opts.spec.get("coalesce", 1))  # the agreed batches per message: a loop hook (workers.coalesce)
        self.rules = dataclasses.replace(opts.rules or gate.GateRules(job_id=opts.job_id), coalesce=most)
        self.codec = codec.CutCodec.for_spec(opts.spec)  # the agreed compression at the cut: a loop hook
        self.acks = Acks(checkpointing=opts.checkpoint_path is not None)
        self.inbox: queue.Queue[Delivery | None] = queue.Queue()  # None: wake up (see ``wake``)
        self.inbound, self.routes = routing(self.roles)
        transient = opts.spec.get("delivery") == "transient"  # the broker may lose batches and answers
        self.outbox = Outbox(transport, self.codec, name=opts.name, job_id=opts.job_id, user_id=opts.user_id,
                             stats=stats, clock=clock, coalesce=most, transient=transient)
        self.answers = Answers() if transient else None  # what we answered, to answer a re-sent batch again
        self.waits = WaitLog(opts.name)
        self._retries = Retries()
        self._unjoined = Unjoined()
        self._last_checkpoint = clock()
        self._checkpoint_asked = False
        self._started = clock()
        self.outages = Outages(opts.broker_timeout_s)
        for role in self.roles:  # no role deadline counts a broker outage (Outages)
            role.use_clock(self.service_time)
        self._restored = False
        self._cpu_serving = time.process_time()  # CPU (all threads) from when the party serves: summary's cpu_seconds

    # ---- lifecycle --------------------------------------------------------------------------

    def run(self) -> Outcome:
        """Take our lease, restore, serve; returns how it ended (never raises for a named exit).

        The checkpoint is read only once the lease is ours: a standby that waited an hour must
        resume from what the party before it wrote last, not from what was there when it started.
        """
        try:
            self._take_lease()
            self._restore()
            self._consume()
            self._cpu_serving = time.process_time()
            now = self.service_time()
            for role in self.roles:
                self._apply(role.start(now), None, role)
            self._loop()
        except PartyExit as exc:
            return self._finish(exc.reason, exc.detail)
        except BrokerError as exc:
            return self._finish(ExitReason.BROKER_UNAVAILABLE, str(exc))
        except Exception as exc:  # a bug: say so once, with the traceback, and still checkpoint
            log.exception("%s: unexpected error", self.opts.name)
            return self._finish(ExitReason.FAILED, f"{type(exc).__name__}: {exc}")
        raise AssertionError("the loop ends only by PartyExit")  # pragma: no cover

    def _finish(self, reason: ExitReason, detail: str) -> Outcome:
        log_at = logging.INFO if reason in (ExitReason.DONE, ExitReason.INTERRUPTED) else logging.ERROR
        log.log(log_at, "%s: exit %s: %s", self.opts.name, reason.value, detail)
        if reason is ExitReason.DONE and self._restored and not self.transport.is_connected:
            self._reconnect_to_finish()
        if self.transport.is_connected and self._restored:  # never overwrite a checkpoint we did not load
            try:
                self._checkpoint(final=True)
            except (PartyExit, BrokerError) as exc:
                log.warning("%s: no final checkpoint: %s", self.opts.name, exc)
        if self.opts.on_exit is not None:
            try:
                self.opts.on_exit(reason)
            except OSError as exc:
                log.warning("%s: could not keep the trained segments: %s", self.opts.name, exc)
        self.transport.close()
        summary: dict[str, Any] = {"party": self.opts.name, "exit": reason.value, "exit_detail": detail,
                                   "seconds": self.clock() - self._started,
                                   "cpu_seconds": time.process_time() - self._cpu_serving, **self.stats.totals()}
        for role in self.roles:
            if role.name == self.opts.primary or not self.opts.primary:
                summary.update(role.summary())
            elif role.summary():
                summary[role.name] = role.summary()
        return Outcome(reason, detail, summary)

    def _reconnect_to_finish(self) -> None:
        """Done while the broker is away: wait for it (logged, ``broker_timeout_s``) so that our last messages
        (a bye, the answers a checkpoint covers) still reach the peers waiting for them."""
        try:
            self._wait_until(lambda: self.transport.is_connected,
                             lambda: f"the broker to come back, to deliver our last messages "
                                     f"({self.transport.status()})",
                             self.opts.broker_timeout_s, ExitReason.BROKER_UNAVAILABLE,
                             "start it (deploy/broker.sh start); our peers wait for our last messages")
        except PartyExit as exc:
            log.warning("%s: finishing without our last messages delivered: %s", self.opts.name, exc.detail)

    def _restore(self) -> None:
        path = self.opts.checkpoint_path
        if path is not None and role_state.restore(path, self.opts.spec, self.roles):
            log.info("%s: resumed from %s", self.opts.name, path)
        self._restored = True

    def _take_lease(self) -> None:
        """Connect, holding this party's lease (a standby waits here, without a deadline, for its turn)."""
        self.transport.start()
        self._wait_until(lambda: self.transport.is_connected or self.transport.lease_refused() is not None,
                         lambda: f"the broker ({self.transport.status()})", self.opts.broker_timeout_s,
                         ExitReason.BROKER_UNAVAILABLE, "start it (deploy/broker.sh start) or fix --amqp-url")
        if self.opts.standby and not self.transport.is_connected:
            log.info("%s: standing by: another party named %r serves job %s; taking over when it stops",
                     self.opts.name, self.opts.name, self.opts.job_id)
        self._wait_until(lambda: self.transport.is_connected,
                         lambda: f"{'our turn' if self.opts.standby else 'our name to be free'} "
                                 f"({self.transport.lease_refused()})",
                         math.inf if self.opts.standby else self.opts.lease_timeout_s, ExitReason.NAME_IN_USE,
                         self.opts.in_use_hint or f"stop the other party named {self.opts.name!r} for job "
                                                  f"{self.opts.job_id!r}, or give this one another name")

    def _consume(self) -> None:
        """Declare what we may, and start consuming."""
        if self.opts.layout is not None:
            try:
                self.transport.declare(self.opts.layout)
            except AccessRefused:  # least privilege: the operator declared the job (splitmq broker setup)
                missing = [q for q in self.inbound if not self.transport.queue_exists(q)]
                if missing:
                    raise PartyExit(ExitReason.CONFIG, f"queues {missing} do not exist and this broker user may not "
                                    "declare them: ask the operator to run `splitmq broker setup` / `add-client`")
        for inbound in self.inbound.values():
            self.transport.consume(inbound.queue, self.inbox.put)
        log.info("%s: serving job %s (%s)", self.opts.name, self.opts.job_id, self.transport.status())

    def _wait_until(self, ready: Callable[[], bool], what: Callable[[], str], deadline_s: float,
                    reason: ExitReason, hint: str) -> None:
        """Wait (logged, with a deadline) for something before the loop starts."""
        since = self.clock()
        while not ready():
            if self.stop():
                raise PartyExit(ExitReason.INTERRUPTED, f"stopped while waiting for {what()}")
            self.transport.check()
            self.waits.watch([Wait(what(), since, deadline_s, reason, hint)], self.clock())
            time.sleep(defaults.POLL_S)

    def service_time(self) -> float:
        """Now on the roles' clock: real time less every broker outage (it stands still during one)."""
        return self.outages.service(self.clock())

    def wake(self) -> None:
        """From any thread: the roles tick at once (e.g. a prediction handed in from outside the loop)."""
        self.inbox.put(None)

    # ---- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            if self.stop():
                raise PartyExit(ExitReason.INTERRUPTED, "signal: finished the current message")
            try:
                delivery: Delivery | None = self.inbox.get(timeout=defaults.POLL_S)
            except queue.Empty:
                delivery = None
            if delivery is not None:
                self._receive(delivery)
            now = self.clock()
            self._run_timers(now)
            served = self.service_time()  # the roles' now for this turn
            for role in self.roles:
                self._apply(role.tick(served), None, role)
            self.transport.check()
            broker = self._own_waits(now)  # while it lasts, the one wait; the roles' clock stands still meanwhile
            if broker:
                self.waits.watch(broker, now)
            else:
                self.waits.watch([w for r in self.roles for w in r.waits(served)], served)
            self.outbox.flush()
            self.transport.ack_many(self.acks.ready())
            self._maybe_checkpoint(now, idle=delivery is None)
            for role in self.roles:
                done = role.finished()
                if done is not None:
                    raise done

    def _own_waits(self, now: float) -> list[Wait]:
        """The broker's wait while it cannot take our messages (then the only wait: the others wait on it)."""
        blocked = self._blocked()
        if blocked is not None:
            return self.outages.waits(f"the broker to take our messages again: it blocks them ({blocked})",
                                      _ALARM_HINT, now)
        problem = None if self.transport.is_connected else f"the broker to come back ({self.transport.status()})"
        return self.outages.waits(problem, "the party resumes where it was when restarted", now)

    def _blocked(self) -> str | None:
        """Why the broker blocks our publishes (a resource alarm), or None."""
        return self.transport.blocked() if self.transport.is_connected else None

    def _confirm_wait(self, since: float) -> Wait:
        """The wait for the broker's confirms, naming the alarm while the broker blocks us: a reply
        published just before it is confirmed only once the alarm clears."""
        blocked = self._blocked()
        why, hint = ("", "") if blocked is None else (f": it blocks our publishes ({blocked})", _ALARM_HINT)
        return Wait("the broker to confirm our replies" + why, since, defaults.CONFIRM_TIMEOUT_S,
                    ExitReason.BROKER_UNAVAILABLE, hint)

    # ---- receiving --------------------------------------------------------------------------

    def _receive(self, delivery: Delivery) -> None:
        """Gate, decode and dispatch one delivery, or each part of a bundle (refused whole if one part is)."""
        self.stats.received(len(delivery.body))
        inc: Incoming | None = None
        admitted: list[tuple[Delivery, Incoming]] = []
        try:
            for part, inc in gate.admit_all(delivery, self.inbound[delivery.queue], self.rules):
                # the codec hook: roles, validation and the stage see float32 whatever crossed the cut
                admitted.append((part, dataclasses.replace(inc, msg=self.codec.incoming(inc.msg))))
        except RejectedMessage as exc:
            self._dead_letter(delivery, exc.reason, exc.detail, admitted[0][1] if admitted else inc)
            return
        self.acks.split(delivery, [part for part, _ in admitted])
        for part, inc in admitted:
            self._dispatch(inc, part, attempt=1)

    def _dispatch(self, inc: Incoming, delivery: Delivery, *, attempt: int) -> None:
        role = self.routes[(inc.queue, inc.msg.kind)]
        key = batch_key(inc) if role.ledger is not None else None
        if key is not None and role.ledger is not None and role.ledger.applied(*key):
            self._repeat(inc, delivery, key)
            return
        if key is not None and role.ledger is not None and inc.source is Source.FORWARD \
                and not role.ledger.plausible(*key):
            self._dead_letter(delivery, "sequence", f"batch {key[1]} is far past {key[0]}'s applied "
                                                    f"{role.ledger.prefix(key[0])}", inc)
            return
        try:
            step = role.handle(inc)
        except RejectedMessage as exc:
            if exc.reason == "not_joined" and isinstance(inc.msg, wire.Forward) and inc.reply_to:
                self._rejoin(inc, delivery, exc.detail)
            else:
                self._dead_letter(delivery, exc.reason, exc.detail, inc)
            return
        except PartyExit as exc:
            if exc.reject_reason:
                self._dead_letter(delivery, exc.reject_reason, exc.detail, None)
            raise
        except Exception as exc:  # not the sender's fault as far as we can tell: retry in place
            self._retry(inc, delivery, attempt, exc)
            return
        self._apply(step, delivery, role)

    def _repeat(self, inc: Incoming, delivery: Delivery, key: tuple[str, int]) -> None:
        """A batch applied before: answer a forward with where it stands (a transient job's broker may have
        lost our answer: the same answer again, while kept); drop a repeated answer."""
        self.stats.duplicate()
        if inc.source is Source.FORWARD and inc.reply_to:
            kept = self.answers.get(*key) if self.answers is not None else None
            answer = kept or wire.Backward(job_id=self.opts.job_id, client_id=key[0], seq=key[1],
                                           outcome=wire.Outcome.DUPLICATE.value)
            self._apply(Step(sends=[Send(ToParty(inc.reply_to), answer, inc.correlation_id)], durable=False),
                        delivery, None)
        else:
            log.debug("%s: dropping a repeated answer for %s batch %d", self.opts.name, *key)
            self._apply(Step(durable=False), delivery, None)

    def _rejoin(self, inc: Incoming, delivery: Delivery, detail: str) -> None:
        """A batch from an owner we do not know: held unacknowledged (``workers.held``), its owner asked to join."""
        client = inc.msg.client_id
        if not self._unjoined.hold(client, inc, delivery, self.clock()):
            return
        log.info("%s: %s; asking it to join (holding its batches)", self.opts.name, detail)
        answer = wire.Backward(job_id=self.opts.job_id, client_id=client, seq=inc.msg.seq,
                               outcome=wire.Outcome.REJOIN.value, error=detail)
        self.outbox.publish(Send(ToParty(inc.reply_to), answer, inc.correlation_id))

    def _retry(self, inc: Incoming, delivery: Delivery, attempt: int, exc: Exception) -> None:
        if attempt >= defaults.HANDLER_ATTEMPTS:
            log.error("%s: handler failed %d times on %s (%s); dead-lettering it", self.opts.name, attempt,
                      inc.correlation_id, exc)
            self._dead_letter(delivery, "handler_error", f"{type(exc).__name__}: {exc}", inc)
            return
        self.stats.rejected("handler_error")
        delay = self._retries.schedule(inc, delivery, attempt, self.clock())
        log.warning("%s: handler failed on %s (attempt %d of %d): %s: %s; retrying in %.2fs", self.opts.name,
                    inc.correlation_id, attempt, defaults.HANDLER_ATTEMPTS, type(exc).__name__, exc, delay,
                    exc_info=attempt == 1)

    def _run_timers(self, now: float) -> None:
        for r in self._retries.due(now):
            self._dispatch(r.inc, r.delivery, attempt=r.attempt)
        self.outbox.resend_due(now)
        again, expired = self._unjoined.due(now)
        for inc, delivery in again:
            self._dispatch(inc, delivery, attempt=1)
        for inc, delivery in expired:
            self._dead_letter(delivery, "not_joined", f"{inc.msg.client_id} did not join within "
                              f"{defaults.JOIN_TIMEOUT_S:.0f}s", inc)

    def _dead_letter(self, delivery: Delivery, reason: str, detail: str, inc: Incoming | None) -> None:
        """Set a message aside with its reason (its sender told why); acked once that is confirmed."""
        tell = self.inbound[delivery.queue].source is Source.FORWARD
        self.acks.finish(delivery, self.outbox.dead_letter(delivery, reason, detail, inc, tell_sender=tell),
                         durable=False)

    # ---- carrying out a step ----------------------------------------------------------------

    def _apply(self, step: Step, delivery: Delivery | None, role: Role | None) -> None:
        futures = [self.outbox.publish(s) for s in step.sends]
        if step.applied:
            assert role is not None and role.ledger is not None, f"{role} applies batches but keeps no ledger"
            for client, seq in step.applied:
                role.ledger.add(client, seq)
            if self.answers is not None:
                self.answers.keep(step)
        if delivery is not None:
            if step.hold is not None:
                self.acks.hold(step.hold, delivery)
            else:
                self.acks.finish(delivery, futures, durable=step.durable)
        for key in step.settle:
            held = self.acks.release(key)
            if held is not None:
                self.acks.finish(held, futures, durable=True)
        # A batch the broker redelivered (its consumer died first) is checkpointed at the end of this turn:
        # RabbitMQ dead-letters a forward returned DELIVERY_LIMIT times, and a trainer killed that often
        # between two checkpoints would otherwise lose the update of a batch whose answer its owner has.
        redelivered = bool(step.applied) and delivery is not None and delivery.redelivered
        self._checkpoint_asked = self._checkpoint_asked or step.checkpoint or redelivered

    # ---- durability -------------------------------------------------------------------------

    def _maybe_checkpoint(self, now: float, *, idle: bool) -> None:
        for send in self.outbox.take_told():
            for role in self.roles:
                self._apply(role.on_unroutable(send, self.service_time()), None, role)
        self.outbox.check()
        pending = self.acks.pending_checkpoint
        if self.opts.checkpoint_path is None:
            return
        due = self._checkpoint_asked or pending >= self.opts.checkpoint_every or (
            pending and (idle or now - self._last_checkpoint >= defaults.CHECKPOINT_INTERVAL_S))
        if due:
            self._checkpoint()

    def _checkpoint(self, *, final: bool = False) -> None:
        """Wait for the replies a checkpoint covers to be confirmed, save, then ack what it covers."""
        self._checkpoint_asked = False
        self.outbox.flush()
        path = self.opts.checkpoint_path
        since = self.clock()
        watched = self.acks.unconfirmed() + (self.outbox.published if final else [])
        while any(not f.done() for f in watched):
            if final and self.clock() - since > 10:
                raise BrokerError("messages still unconfirmed by the broker after 10 s")
            self.waits.watch([self._confirm_wait(since)], self.clock())
            time.sleep(0.005)
        self.transport.ack_many(self.acks.ready())
        if path is not None:
            role_state.save(path, self.opts.spec, self.roles)
        self.transport.ack_many(self.acks.checkpointed())
        self._last_checkpoint = self.clock()

