"""The bottom: a data owner's segment. Data in, activations out, gradients applied.

It joins (``hello``), then keeps up to ``max_in_flight`` batches of the current epoch in
flight; each gradient is applied once (the loop drops repeats), against the weights that
produced its batch. At an epoch's end it syncs its bottom with the other owners (average or
hand-off, ``roles.sync``), evaluates, and asks for a checkpoint; after the last epoch it
says ``bye``. After a restart it re-creates the same batches (the order is a function of
seed, owner and epoch): a gradient already waiting in its queue is applied without sending
the batch again. Every wait has a deadline and a named exit (``waits``).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from splitmq.shared import data, topology, validate, wire
from splitmq.shared.config import Delivery, JobConfig
from splitmq.shared.errors import RejectedMessage
from splitmq.shared.ledger import Ledger
from splitmq.shared.privacy import ActivationCollapse
from splitmq.shared.stage import Stage
from splitmq.workers.exits import ExitReason, PartyExit, Wait
from splitmq.workers.roles import owner_waits
from splitmq.workers.roles.base import IfUnroutable, Inbound, Incoming, Role, Send, Source, Step, ToStage
from splitmq.workers.roles.evaluation import EvalPass
from splitmq.workers.roles.owner_report import OwnerReport
from splitmq.workers.roles.owner_waits import InFlight, OwnerTimeouts, Request
from splitmq.workers.roles.sync import OwnerSync
from splitmq.workers.stats import Stats

log = logging.getLogger(__name__)


class BottomRole(Role):
    """Drives one data owner's training."""

    name = "bottom"

    def __init__(self, stage: Stage, *, cfg: JobConfig, me: str, index: int, samples: data.Data, dest: str,
                 reply_queue: str, ledger: Ledger, stats: Stats, spec: dict[str, Any], sync: OwnerSync,
                 evaluate: bool = True, send_labels: bool = True, order_seed: int = 0,
                 timeouts: OwnerTimeouts = OwnerTimeouts(), local_scores: Callable[[], dict[str, float]] | None = None,
                 aligned: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.cfg, self.me, self.index, self.samples = stage, cfg, me, index, samples
        self.dest, self.reply_queue, self.ledger, self.stats, self.spec = dest, reply_queue, ledger, stats, spec
        self.sync, self.send_labels, self.order_seed, self.timeouts = sync, send_labels, order_seed, timeouts
        self.local_scores, self.clock = local_scores, clock
        self.evaluate_wanted = evaluate
        self.aligned = aligned  # a vertical party waits for the shared sample ids (roles/align.py)
        self._measure(samples)
        self.joined = False
        self.hello_since: float | None = None
        self.in_flight: dict[int, InFlight] = {}
        self.early: dict[int, wire.Backward] = {}
        self.turns: dict[int, wire.Weights] = {}
        self.requests: dict[str, Request] = {}
        self.eval: EvalPass | None = None
        self.synced_epoch = self.evaluated_epoch = self.turn_epoch = -1
        self.bye_sent = False
        self.report = OwnerReport(me, cfg, stats)
        self.started = clock()
        self._orders: dict[int, list[torch.Tensor]] = {}

    def _measure(self, samples: data.Data) -> None:
        self.samples = samples
        self.evaluate = self.evaluate_wanted and samples.test is not None and len(samples.test) > 0
        self.per_epoch = data.batches_per_epoch(len(samples.train), self.cfg.batch_size)
        self.total = self.cfg.epochs * self.per_epoch

    def align(self, train_ids: torch.Tensor, test_ids: torch.Tensor) -> None:
        """Train and evaluate on exactly these samples (the ids all parties share, split by the label holder)."""
        pool = data.pool(self.samples)
        self._measure(data.Data(pool.only(train_ids), pool.only(test_ids) if len(test_ids) else None))
        self._orders = {}
        self.aligned = True
        log.info("%s: aligned: %d training and %d evaluation samples shared with the other parties", self.me,
                 len(train_ids), len(test_ids))

    @property
    def applied(self) -> Ledger:
        """Our batches whose gradient is applied (the loop records them; we read them)."""
        assert self.ledger is not None
        return self.ledger

    def inbound(self) -> list[Inbound]:
        kinds = frozenset({wire.Kind.BACKWARD, wire.Kind.WEIGHTS, wire.Kind.HELLO})
        return [Inbound(self.reply_queue, Source.REPLY, kinds, wire.MAX_MESSAGE_BYTES)]

    # ---- joining ----------------------------------------------------------------------------

    def start(self, now: float) -> Step:
        self.report.begin(now, self.applied.count(self.me))
        self.started = now
        return self._hello(now)

    def _hello(self, now: float) -> Step:
        self.joined, self.hello_since = False, now
        facts = {"client_index": self.index, "num_samples": len(self.samples.train),
                 "batches_per_epoch": self.per_epoch, "applied_prefix": self.applied.prefix(self.me)}
        cid = topology.request_id(self.me, "hello", time.time_ns())
        self.requests = {k: v for k, v in self.requests.items() if ":hello:" not in k}
        self.requests[cid] = Request(f"{self.dest}'s answer to our hello", now, self.timeouts.join_s)
        msg = wire.Hello(job_id=self.cfg.job_id, client_id=self.me, seq=0, spec=self.spec, facts=facts)
        return Step(sends=[Send(ToStage(self.dest), msg, cid, if_unroutable=IfUnroutable.RETRY)])

    def _joined(self, msg: wire.Hello) -> Step:
        if msg.error:
            raise PartyExit(ExitReason.CONFIG, f"{self.dest} refused our join: {msg.error}")
        self.joined = True
        theirs = msg.facts.get("applied_prefix", -1)
        mine = self.applied.prefix(self.me)
        log.info("%s: joined job %s at %s (it has applied our batches up to %s; our checkpoint: %d%s)", self.me,
                 self.cfg.job_id, self.dest, theirs, mine,
                 f"; expecting the gradients of {mine + 1}..{theirs} from our queue" if theirs > mine else "")
        now = self.clock()
        step = Step(durable=False)
        for batch in self.in_flight.values():  # after a rejoin: the stage may have lost them
            step.sends.append(self._resend(batch, now))
        return step

    # ---- messages ---------------------------------------------------------------------------

    def handle(self, inc: Incoming) -> Step:
        msg = inc.msg
        if msg.client_id != self.me:
            raise RejectedMessage("identity", f"an answer for {msg.client_id} in {self.me}'s queue")
        request = self.requests.pop(inc.correlation_id, None)
        ours = request is not None or inc.correlation_id == topology.batch_id(self.me, msg.seq)
        if isinstance(msg, wire.Backward) and msg.outcome in (wire.Outcome.REFUSED.value, wire.Outcome.REJOIN.value) \
                and not ours:  # about a message we never sent (someone else wrote under our name)
            log.warning("%s: ignoring a %s answer to %s, which is not ours: %s", self.me, msg.outcome,
                        inc.correlation_id, msg.error)
            return Step(durable=False)
        if isinstance(msg, wire.Backward) and msg.outcome == wire.Outcome.REFUSED.value:
            what = request.what if request else f"batch {msg.seq}"
            raise PartyExit(ExitReason.PEER_REFUSED, f"{self.dest} refused {what}: {msg.error}")
        if isinstance(msg, wire.Hello):
            return self._joined(msg) if request is not None else Step(durable=False)
        if isinstance(msg, wire.Weights):
            return self._weights(inc, msg)
        assert isinstance(msg, wire.Backward)
        if msg.outcome == wire.Outcome.EVALUATED.value:
            return self._evaluated(inc, msg)
        if msg.outcome == wire.Outcome.REJOIN.value:
            if not self.joined:  # a join is already under way
                return Step(durable=False)
            log.warning("%s: %s does not know us (it lost its state): joining again", self.me, self.dest)
            step = self._hello(self.clock())
            step.durable = False
            return step
        return self._training_answer(msg)

    def _training_answer(self, msg: wire.Backward) -> Step:
        seq = msg.seq
        if not 0 <= seq < self.total:
            raise RejectedMessage("sequence", f"an answer for batch {seq}; this run has batches 0..{self.total - 1}")
        batch = self.in_flight.get(seq)
        if msg.outcome == wire.Outcome.DUPLICATE.value:
            if batch is not None and batch.duplicate_at is None:
                batch.duplicate_at = self.clock()
            return Step(durable=False)
        if msg.outcome == wire.Outcome.SKIPPED.value:
            if batch is None:
                return Step(durable=False)
            del self.in_flight[seq]
            self.stage.discard(seq)
            self.stats.skipped("party_timeout")
            return Step(applied=[(self.me, seq)])
        if batch is None:  # answered before we re-sent it (we restarted): apply it when we get there
            if seq in self.early:  # answered twice (we sent it twice): the answer we hold will do
                return Step(durable=False)
            self.early[seq] = msg
            return Step(hold=("early", seq))
        return self._apply(seq, batch, msg)

    def _apply(self, seq: int, batch: InFlight, msg: wire.Backward) -> Step:
        try:
            grad = validate.check_gradient(msg.grad, self.stage.output_shape(seq))
        except RejectedMessage as exc:
            raise PartyExit(ExitReason.PEER_FAULT, f"{self.dest} sent an unusable gradient for batch {seq}: "
                            f"{exc.detail} (a diverged top sends NaN: lower the learning rate)",
                            reject_reason=exc.reason) from None
        try:
            _, staleness = self.stage.backward(seq, grad)
        except ActivationCollapse as exc:
            raise PartyExit(ExitReason.COLLAPSED, f"batch {seq}: {exc}") from None
        del self.in_flight[seq]
        now = self.clock()
        self.stats.applied(len(grad), loss=msg.loss, staleness=staleness, round_trip_s=now - batch.first_sent)
        if msg.loss is not None:
            self.report.losses[seq] = msg.loss
        self.stats.gauge("in_flight", len(self.in_flight))
        self.report.progress(now, self.epoch_of(seq), self.applied.count(self.me) + 1, self.total)
        if seq % 10 == 0:
            self.stats.history(epoch=self.epoch_of(seq), seq=seq, loss=msg.loss if msg.loss is not None
                               else self.stats.last_loss, samples=self.stats.counts["samples"])
        return Step(applied=[(self.me, seq)])

    def _weights(self, inc: Incoming, msg: wire.Weights) -> Step:
        names = set(self.stage.segment.state_dict())
        if set(msg.tensors) != names:
            raise RejectedMessage("shape", f"a bottom with parameters {sorted(msg.tensors)}; ours are {sorted(names)}")
        if inc.correlation_id == topology.request_id(self.me, "weights", msg.seq):  # the average we waited for
            self._adopt(msg)
            self.synced_epoch = max(self.synced_epoch, msg.seq)
            return Step(checkpoint=True)
        if inc.correlation_id == topology.request_id(self.me, "turn", msg.seq) and msg.seq > self.turn_epoch:
            self.turns[msg.seq] = msg
            return Step(hold=("turn", msg.seq))
        return Step(durable=False)

    def _adopt(self, msg: wire.Weights) -> None:
        self.stage.load_weights(dict(msg.tensors))  # copied into the live parameters

    def _evaluated(self, inc: Incoming, msg: wire.Backward) -> Step:
        if self.eval is not None:
            self.eval.answered(msg)
        return Step(durable=False)

    # ---- driving ----------------------------------------------------------------------------

    def epoch_of(self, seq: int) -> int:
        return seq // self.per_epoch

    def current_epoch(self) -> int:
        """The epoch of the first batch not yet applied (``epochs`` when all are)."""
        first = next(self.applied.unapplied(self.me))
        return min(self.epoch_of(first), self.cfg.epochs)

    def tick(self, now: float) -> Step:
        if not self.joined or self.bye_sent or not self.aligned:
            return Step()
        finished = self.current_epoch() - 1
        if finished > self.synced_epoch:
            return self._sync(finished, now)
        if finished > self.evaluated_epoch:
            return self._evaluate(finished, now)
        epoch = self.current_epoch()
        if epoch >= self.cfg.epochs:
            return self._bye()
        if self.sync.waits_for_turn(epoch) and self.turn_epoch < epoch:
            return self._take_turn(epoch, now)
        return self._fill(epoch, now)

    def _sync(self, epoch: int, now: float) -> Step:
        if not self.sync.shares_after(epoch):
            self.synced_epoch = epoch
            return Step()
        what = "weights" if self.sync.waits_for_average(epoch) else "handoff"
        cid = topology.request_id(self.me, what, epoch)
        if cid in self.requests:
            return Step()
        msg = wire.Weights(job_id=self.cfg.job_id, client_id=self.me, seq=epoch, num_samples=len(self.samples.train),
                           tensors={k: v.detach().cpu() for k, v in self.stage.segment.state_dict().items()})
        if what == "handoff":
            self.synced_epoch = epoch
        else:
            self.requests[cid] = Request(f"the epoch-{epoch} bottom average", now, self.timeouts.peer_s)
        return Step(sends=[Send(ToStage(self.dest), msg, cid)])

    def _take_turn(self, epoch: int, now: float) -> Step:
        msg = self.turns.pop(epoch, None)
        if msg is None:
            cid = topology.request_id(self.me, "turn", epoch)
            self.requests.setdefault(cid, Request(f"our turn: the previous owner's bottom for epoch {epoch}",
                                                   now, self.timeouts.turn_s))
            return Step()
        self._adopt(msg)
        self.turn_epoch = epoch
        return Step(settle=[("turn", epoch)], checkpoint=True)

    def _evaluate(self, epoch: int, now: float) -> Step:
        if not self.evaluate:
            self._epoch_done(epoch, {})
            return Step(checkpoint=True)
        if self.eval is None or self.eval.epoch != epoch:
            assert self.samples.test is not None
            self.eval = EvalPass(epoch, self.samples.test, self.cfg.batch_size, self.me, self.cfg.job_id,
                                 send_labels=self.send_labels, window=max(4, self.cfg.max_in_flight))
        step = Step()
        for cid, msg in self.eval.due(self.stage):
            self.requests[cid] = Request(f"the score of evaluation batch {msg.seq}", now, self.timeouts.peer_s)
            step.sends.append(Send(ToStage(self.dest), msg, cid))
        if self.eval.complete():
            self._epoch_done(epoch, self.eval.metrics or (self.local_scores() if self.local_scores else {}))
            self.eval = None
            step.checkpoint = True
        return step

    def _epoch_done(self, epoch: int, metrics: dict[str, float]) -> None:
        self.evaluated_epoch = epoch
        self.report.epoch_done(self.clock(), epoch, metrics, self.applied.count(self.me), self.total,
                               self.applied.prefix(self.me))

    def _bye(self) -> Step:
        self.bye_sent = True
        msg = wire.Bye(job_id=self.cfg.job_id, client_id=self.me, seq=self.applied.count(self.me), completed=True)
        return Step(sends=[Send(ToStage(self.dest), msg, topology.request_id(self.me, "bye", 0))])

    def _fill(self, epoch: int, now: float) -> Step:
        """Send batches of ``epoch`` until ``max_in_flight`` are out; re-send overdue ones."""
        step = Step()
        for seq in self.applied.unapplied(self.me):
            if self.epoch_of(seq) != epoch or len(self.in_flight) >= self.cfg.max_in_flight:
                break
            if seq in self.in_flight:
                continue
            step.add(self._send(seq, now))
        for batch in self.in_flight.values():
            if now - batch.last_sent > self.timeouts.resend_after_s:
                log.warning("%s: no answer to batch %d for %.0fs; sending it again (attempt %d)", self.me,
                            batch.msg.seq, now - batch.first_sent, batch.msg.attempt + 2)
                step.sends.append(self._resend(batch, now))
        return step

    def _send(self, seq: int, now: float) -> Step:
        epoch, i = divmod(seq, self.per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: data.batch_order(len(self.samples.train), self.cfg.batch_size,
                                                    self.order_seed, epoch)}
        batch = self.samples.train.batch(self._orders[epoch][i])
        assert batch.x is not None
        activations = self.stage.forward(seq, batch.x)                   # (B, *cut_shape)
        msg = wire.Forward(job_id=self.cfg.job_id, client_id=self.me, seq=seq, model_version=self.stage.version,
                           activations=activations, labels=batch.y if self.send_labels else None,
                           sample_ids=batch.ids, epoch=epoch)
        flight = InFlight(msg, now, now)
        self.in_flight[seq] = flight
        early = self.early.pop(seq, None)
        if early is not None:  # replaying after a restart: its gradient already waits in our queue
            step = self._apply(seq, flight, early)
            step.settle.append(("early", seq))
            step.checkpoint = not self.early  # caught up: make it durable before anything else
            return step
        self.stats.gauge("in_flight", len(self.in_flight))
        self.stats.gauge("epoch", epoch)
        return Step(sends=[Send(ToStage(self.dest), msg, topology.batch_id(self.me, seq))])

    def _resend(self, batch: InFlight, now: float) -> Send:
        batch.msg = batch.msg.copy(attempt=batch.msg.attempt + 1)
        batch.last_sent = now
        return Send(ToStage(self.dest), batch.msg, topology.batch_id(self.me, batch.msg.seq))

    # ---- waits, end, state ------------------------------------------------------------------

    def waits(self, now: float) -> list[Wait]:
        hint = (f"is `splitmq server` running for job {self.cfg.job_id}? Running this worker again resumes "
                "where it stopped")
        out = owner_waits.waits(self.requests.values(), self.in_flight.values(), dest=self.dest,
                                timeouts=self.timeouts, hint=hint, now=now,
                                state_hint=owner_waits.TRANSIENT_STATE_HINT
                                if self.cfg.delivery == Delivery.TRANSIENT else owner_waits.STATE_HINT)
        if self.joined and not self.aligned:
            out.append(Wait(f"the sample ids we share with the other parties, from {self.dest}", self.started,
                            self.timeouts.join_s, ExitReason.PEER_SILENT, hint))
        return out

    def finished(self) -> PartyExit | None:
        if self.bye_sent:
            return PartyExit(ExitReason.DONE, f"trained {self.cfg.epochs} epochs ({self.total} batches)")
        return None

    def state(self) -> dict[str, Any]:
        return {"stage": self.stage.state(), "synced_epoch": self.synced_epoch,
                "evaluated_epoch": self.evaluated_epoch, "turn_epoch": self.turn_epoch, "client_id": self.me}

    def load_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("client_id", self.me) != self.me:
            raise PartyExit(ExitReason.CONFIG, f"the checkpoint is {state['client_id']}'s, not {self.me}'s")
        self.stage.load_state(state["stage"])
        self.synced_epoch = int(state["synced_epoch"])
        self.evaluated_epoch = int(state["evaluated_epoch"])
        self.turn_epoch = int(state["turn_epoch"])

    def summary(self) -> dict[str, Any]:
        return {**self.report.summary(self.clock(), self.applied.count(self.me), self.total),
                "version": self.stage.version}
