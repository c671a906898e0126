"""``splitmq server``: a party holding a non-bottom segment: the top (with the loss) or a middle hop.

It consumes forward messages with manual acks and a bounded prefetch, applies each client's
batches once and in order, and acks a message only once its effect is safe: after the reply
is confirmed, and, with a checkpoint directory, after a checkpoint holds it. As the last
stage it computes the loss and answers with the gradient; as a middle hop it forwards its
output to the next stage and relays the gradient back when it comes. Bad input is
dead-lettered with its reason; a batch the handler keeps failing on reaches the dead-letter
queue through the queue's delivery limit.
"""
from __future__ import annotations

import argparse
import collections
import logging
import resource
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from splitmq.shared import checkpoint, data, models, schedule, topology, validate, wire
from splitmq.shared.broker import Broker, Delivery, declare, queue_depth
from splitmq.shared.config import JobConfig, differences
from splitmq.shared.errors import AccessRefused, BrokerError, ConfigError, DecodeError, RejectedMessage, Unroutable
from splitmq.shared.metrics import Metrics, serve
from splitmq.shared.stage import Stage, evaluate_correct
from splitmq.workers import runtime
from splitmq.workers.rounds import SYNC_TIMEOUT_S, BottomRounds
from splitmq.workers.vertical import VerticalJoin, join, split_gradient

log = logging.getLogger(__name__)

#: Gradients kept per client to answer a re-sent batch (its gradient may have been lost).
RESEND_CACHE = 64
#: Checkpoint at least this often while holding acks, however few batches came.
CHECKPOINT_INTERVAL_S = 5.0
#: ``--next-stage`` value meaning "the sending client's own head" (U-shaped runs).
SENDER_HEAD = "@head"


def head_stage(client: str) -> str:
    """Stage name of a client's head segment in a U-shaped run."""
    return f"{client}-head"


def _label_table(ds: data.Dataset) -> torch.Tensor:
    """Labels by global sample id, for runs where labels never travel with the batch."""
    ids = torch.cat([ds.train.ids, ds.test.ids])
    table = torch.full((int(ids.max()) + 1,), -1, dtype=torch.int64)
    table[ids] = torch.cat([ds.train.y, ds.test.y])
    return table


@dataclass(frozen=True)
class TrainerOptions:
    amqp_url: str
    tls: dict[str, str] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    require_identity: bool = False
    prefetch: int = 256
    run_dir: str | None = None
    stage: str = topology.TOP_STAGE      # our forward queue's name (and reply queue's, when relaying)
    segment: int = -1                    # which segment of the model we hold
    next_stage: str | None = None        # None: we are last; a stage name, or SENDER_HEAD
    vertical_timeout_s: float = 30.0     # vertical: how long to wait for a batch's missing parts
    private_outputs: bool = False        # U-shaped head: loss and accuracy stay here, never sent
    sync_timeout_s: float = SYNC_TIMEOUT_S  # bottom averaging: close a round without absent owners after this


@dataclass
class _Relayed:
    """A forward message we passed on, waiting for the next stage's answer."""

    delivery: Delivery
    client: str
    seq: int
    train: bool


class Trainer:
    """Serves one stage: consumes forward messages, answers each with a gradient."""

    def __init__(self, cfg: JobConfig, opts: TrainerOptions, *, metrics: Metrics,
                 stop: runtime.StopFlag | None = None) -> None:
        self.cfg, self.opts, self.metrics = cfg, opts, metrics
        self.stop = stop if stop is not None else runtime.StopFlag()
        self.party = opts.stage
        self.is_last = opts.next_stage is None
        dataset = data.load(cfg.dataset, cfg.data_dir, cfg.test_fraction)  # once: schedule length and labels
        self.stage, in_shape = self._build_stage(len(dataset.train.y))
        self.limits = validate.Limits(cfg.job_id, in_shape, cfg.batch_size)
        self.num_classes = models.get_spec(cfg.model).num_classes
        self.labels_by_id = _label_table(dataset) if cfg.label_source == "top" and self.is_last else None
        parties = [f"client-{i}" for i in range(cfg.vertical_parts)]
        self.vertical = VerticalJoin(parties, timeout_s=opts.vertical_timeout_s) if cfg.vertical_parts else None
        self.rounds = (BottomRounds(mode=cfg.bottom_sync, num_clients=cfg.num_clients, epochs=cfg.epochs,
                                    timeout_s=opts.sync_timeout_s)
                       if cfg.bottom_sync != "independent" else None)
        self.last_applied: dict[str, int] = {}
        self.recent: dict[str, collections.OrderedDict[int, bytes]] = collections.defaultdict(collections.OrderedDict)
        self.relayed: dict[str, _Relayed] = {}
        self.declared: set[str] = set()  # next stages whose forward queue we made sure exists
        self.eval_counts: dict[str, list[int]] = {}
        self.test_accuracy = 0.0  # of the latest evaluation pass(es) this stage scored (0 before any)
        self.unconfirmed: list[Future[None]] = []
        self.ckpt_path = checkpoint.path_for(opts.checkpoint_dir, self.party) if opts.checkpoint_dir else None
        self.history = runtime.History(opts.run_dir, self.party)
        self.inbox = runtime.Inbox()
        self.step_times: list[float] = []
        self.losses: list[float] = []  # last stage: every training batch's loss, in order
        self.counts: collections.Counter[str] = collections.Counter()
        self.broker: Broker | None = None
        self._last_checkpoint = time.monotonic()

    def _build_stage(self, num_train: int) -> tuple[Stage, tuple[int, ...]]:
        cfg = self.cfg
        lr_at = schedule.for_party(cfg, None, num_train)
        if cfg.vertical_parts:
            _, top = models.vertical_segments(cfg.vertical_parts, cfg.seed)
            return Stage(top, lr=cfg.lr, momentum=cfg.momentum, schedule=lr_at), cfg.cut_shapes()[0]
        segments = models.build_segments(cfg.model, cfg.cuts, cfg.seed)
        index = self.opts.segment % len(segments)
        if index == 0:
            raise ConfigError("segment 0 is a data owner's bottom: run it with `splitmq worker`")
        if self.is_last != (index == len(segments) - 1):
            raise ConfigError(f"segment {index} of {len(segments)}: only the last has no --next-stage")
        stage = Stage(segments[index], lr=cfg.lr, momentum=cfg.momentum, stash_weights=not self.is_last,
                      schedule=lr_at)
        return stage, models.cut_shapes(cfg.model, cfg.cuts)[index - 1]

    # ---- lifecycle ------------------------------------------------------------------------

    def restore(self) -> None:
        state = checkpoint.load(self.ckpt_path) if self.ckpt_path else None
        if state is None:
            return
        diffs = differences(self.cfg.agreed(), state["config"])
        if diffs:
            raise ConfigError("checkpoint was written for another job: " + "; ".join(diffs))
        self.stage.load_state(state["stage"])
        self.last_applied = dict(state["last_applied"])
        if self.rounds is not None:
            self.rounds.load_state(state["rounds"])
        log.info("%s: resumed from checkpoint (version %d, clients %s)", self.party, self.stage.version,
                 self.last_applied)

    def connect(self) -> None:
        job = self.cfg.job_id
        parties = () if self.is_last else (self.party,)
        try:
            declare(self.opts.amqp_url, topology.job_layout(job, stages=(self.party,), parties=parties), self.opts.tls)
        except AccessRefused:  # a least-privilege trainer: the admin declared the job (splitmq broker setup)
            queue_depth(self.opts.amqp_url, topology.forward_queue(job, self.party), self.opts.tls)
        self.broker = Broker(self.opts.amqp_url, name=self.party, prefetch=self.opts.prefetch, tls=self.opts.tls,
                             on_reconnect=lambda: self.metrics.reconnects.labels(self.metrics.role).inc())
        self.broker.start()
        self.acks = runtime.HeldAcks(self.broker, hold=self.ckpt_path is not None)
        self.broker.consume(topology.forward_queue(job, self.party), self.inbox.put)
        if not self.is_last:
            self.broker.consume(topology.reply_queue(job, self.party), self.inbox.put)
        log.info("%s: serving job %s on %s", self.party, job, runtime.redact(self.opts.amqp_url))

    def run(self) -> dict[str, Any]:
        """Serve until stopped (SIGTERM); returns the summary."""
        started = time.monotonic()
        self.restore()
        self.connect()
        assert self.broker is not None
        try:
            while not self.stop:
                delivery = self.inbox.get()
                if delivery is not None:
                    self.handle(delivery)
                else:
                    self.broker.check()
                    self._on_idle()
                self._maybe_checkpoint(idle=delivery is None)
        finally:
            self.checkpoint()
            self.broker.close()
        return self.summary(time.monotonic() - started)

    def _on_idle(self) -> None:
        if self.rounds is not None:
            for epoch in self.rounds.overdue():
                log.warning("%s: closing the epoch-%d bottom average without the absent client(s)", self.party, epoch)
                self._send_weights(self.rounds.close(epoch))
        if self.vertical is not None:
            for seq, parts in self.vertical.expired():
                self._skip_vertical(seq, parts)

    # ---- messages -------------------------------------------------------------------------

    def handle(self, delivery: Delivery) -> None:
        """Decode, validate and dispatch one delivery; never raises for bad input."""
        assert self.broker is not None
        self.metrics.bytes.labels(self.metrics.role, "received").inc(len(delivery.body))
        try:
            msg = wire.decode(delivery.body)
            if delivery.queue == topology.forward_queue(self.cfg.job_id, self.party):
                validate.check_identity(delivery.user_id, msg.client_id, delivery.reply_to,
                                        require=self.opts.require_identity)
            self._dispatch(msg, delivery)
        except DecodeError as exc:
            self.dead_letter(delivery, validate.decode_reason(exc), str(exc))
        except RejectedMessage as exc:
            self.dead_letter(delivery, exc.reason, exc.detail)
        except Exception:
            # Not the sender's fault as far as we can tell: return it; the queue's delivery
            # limit dead-letters it if it keeps failing.
            log.exception("%s: handler failed on %s; returning it to the queue", self.party, delivery.message_id)
            self.metrics.reject("handler_error")
            self.broker.requeue(delivery)

    def _dispatch(self, msg: wire.AnyMessage, delivery: Delivery) -> None:
        if isinstance(msg, wire.Forward):
            validate.check_forward(msg, self.limits)
            if self._is_duplicate(msg, delivery):
                return
            if not self.is_last:
                self._relay_forward(msg, delivery)
            elif self.vertical is not None:
                self._vertical_part(msg, delivery)
            elif msg.train:
                self._train(msg, delivery)
            else:
                self._evaluate(msg, delivery)
        elif isinstance(msg, wire.Backward) and not self.is_last:
            self._relay_backward(msg, delivery)
        elif isinstance(msg, wire.Hello):
            self._hello(msg, delivery)
        elif isinstance(msg, wire.Weights) and self.rounds is not None:
            sends = self.rounds.contribute(epoch=msg.seq, client=msg.client_id, tensors=dict(msg.tensors),
                                           reply_to=delivery.reply_to or msg.client_id,
                                           correlation_id=delivery.correlation_id or "", num_samples=msg.num_samples)
            self._send_weights(sends)
            self._done(delivery, None)
        else:
            raise RejectedMessage("kind", f"{self.party} does not take {msg.kind.value} messages here")

    def _is_duplicate(self, msg: wire.Forward, delivery: Delivery) -> bool:
        """A re-sent training batch already applied: answer again from the cache, apply nothing."""
        if not msg.train:
            return False
        last = self.last_applied.get(msg.client_id, -1)
        validate.check_sequence(msg.seq, last)
        if msg.seq > last:
            return False
        self.counts["duplicates"] += 1
        self.metrics.batches.labels(self.metrics.role, "duplicate").inc()
        cached = self.recent[msg.client_id].get(msg.seq)
        self._done(delivery, self._publish_reply(delivery.reply_to or msg.client_id, delivery, cached)
                   if cached else None)
        return True

    def _publish_reply(self, target: str, delivery: Delivery, body: bytes) -> Future[None]:
        assert self.broker is not None
        self.metrics.bytes.labels(self.metrics.role, "sent").inc(len(body))
        return self.broker.publish(topology.gradients_exchange(self.cfg.job_id), topology.reply_routing_key(target),
                                   body, message_id=f"{delivery.message_id}:reply",
                                   correlation_id=delivery.correlation_id)

    def _reply(self, msg: wire.Message, delivery: Delivery) -> Future[None]:
        return self._publish_reply(delivery.reply_to or msg.client_id, delivery, msg.encode())

    def _done(self, delivery: Delivery, future: Future[None] | None) -> None:
        """Ack once the reply is confirmed (and, when holding, once checkpointed)."""
        assert self.broker is not None
        if self.ckpt_path is not None:
            if future is not None:
                self.unconfirmed.append(future)
            self.acks.done(delivery)
        elif future is None:
            self.broker.ack(delivery)
        else:
            broker, party = self.broker, self.party
            future.add_done_callback(lambda f: broker.ack(delivery) if f.exception() is None
                                     else log.error("%s: reply to %s failed: %s", party, delivery.message_id,
                                                    f.exception()))

    def _applied(self, client: str, seq: int, reply: wire.Backward, delivery: Delivery, size: int) -> None:
        """Record batch ``seq`` of ``client`` as applied and send its gradient (cached for re-sends)."""
        self.last_applied[client] = seq
        body = reply.encode()
        cache = self.recent[client]
        cache[seq] = body
        while len(cache) > RESEND_CACHE:
            cache.popitem(last=False)
        self._done(delivery, self._publish_reply(delivery.reply_to or client, delivery, body))
        self.counts["applied"] += 1
        self.counts["samples"] += size
        m, role = self.metrics, self.metrics.role
        m.batches.labels(role, "applied").inc()
        m.samples.labels(role).inc(size)
        if reply.loss >= 0:
            m.loss.labels(role).set(reply.loss)
        m.last_progress.labels(role).set(time.time())
        m.clients.labels(role).set(len(self.last_applied))
        if self.counts["applied"] % 20 == 0:
            self.history.record(epoch=-1, seq=self.counts["applied"], loss=reply.loss, samples=self.counts["samples"])

    def _train(self, msg: wire.Forward, delivery: Delivery) -> None:
        labels = self._labels(msg)
        result = self._timed_step(msg.activations, labels)
        self.losses.append(result.loss)
        private = self.opts.private_outputs
        reply = wire.Backward(job_id=msg.job_id, client_id=msg.client_id, seq=msg.seq, model_version=self.stage.version,
                              grad=result.grad_input, loss=-1.0 if private else result.loss,
                              correct=-1 if private else result.correct)
        if private:
            self.metrics.loss.labels(self.metrics.role).set(result.loss)
        self._applied(msg.client_id, msg.seq, reply, delivery, len(labels))

    def _timed_step(self, x: torch.Tensor, labels: torch.Tensor) -> Any:
        started = time.perf_counter()
        result = self.stage.loss_step(x, labels)
        step = time.perf_counter() - started
        self.step_times.append(step)
        self.metrics.step_time.labels(self.metrics.role).observe(step)
        return result

    def _labels(self, msg: wire.Forward) -> torch.Tensor:
        if self.labels_by_id is None:
            if msg.labels is None:
                raise RejectedMessage("shape", "labels missing (label_source is 'batch')")
            labels = msg.labels
        else:
            ids = msg.sample_ids
            if ids is None or int(ids.min()) < 0 or int(ids.max()) >= len(self.labels_by_id):
                raise RejectedMessage("shape", "sample ids missing or unknown (label_source is 'top')")
            labels = self.labels_by_id[ids]
        validate.check_labels(labels, self.num_classes)
        return labels

    def _evaluate(self, msg: wire.Forward, delivery: Delivery) -> None:
        labels = self._labels(msg)
        loss_sum, correct = evaluate_correct(self.stage.infer(msg.activations), labels)
        self._count_eval(msg.client_id, msg.seq, correct, len(labels))
        private = self.opts.private_outputs
        reply = wire.Backward(job_id=msg.job_id, client_id=msg.client_id, seq=msg.seq, model_version=self.stage.version,
                              loss=-1.0 if private else loss_sum / len(labels), correct=-1 if private else correct)
        self._done(delivery, self._reply(reply, delivery))

    def _count_eval(self, client: str, seq: int, correct: int, total: int) -> None:
        counts = self.eval_counts.setdefault(client, [0, 0])
        if seq == 0:
            counts[:] = [0, 0]
        counts[0] += correct
        counts[1] += total
        self.test_accuracy = (sum(c[0] for c in self.eval_counts.values())
                              / max(1, sum(c[1] for c in self.eval_counts.values())))
        self.metrics.test_accuracy.labels(self.metrics.role).set(self.test_accuracy)
        self.metrics.batches.labels(self.metrics.role, "evaluated").inc()

    def _hello(self, msg: wire.Hello, delivery: Delivery) -> None:
        mine = self.cfg.agreed()
        diffs = differences(mine, dict(msg.spec))
        if diffs:
            log.warning("%s: client %s has a different job config: %s", self.party, msg.client_id, "; ".join(diffs))
        else:
            log.info("%s: client %s joined (last applied seq %d)", self.party, msg.client_id,
                     self.last_applied.get(msg.client_id, -1))
        reply = wire.Hello(job_id=self.cfg.job_id, client_id=msg.client_id, seq=msg.seq, spec=mine,
                           error="; ".join(diffs))
        self._done(delivery, self._reply(reply, delivery))

    # ---- middle hop: forward on, relay gradients back ------------------------------------

    def _relay_forward(self, msg: wire.Forward, delivery: Delivery) -> None:
        key = f"{delivery.correlation_id}>{self.party}"
        if key in self.relayed:  # the same message again while its answer is pending
            self._done(delivery, None)
            return
        output = self.stage.forward(key, msg.activations) if msg.train else self.stage.infer(msg.activations)
        dest = head_stage(msg.client_id) if self.opts.next_stage == SENDER_HEAD else self.opts.next_stage
        assert dest is not None and self.broker is not None
        if dest not in self.declared:  # so that batches wait for a next stage that is not up yet
            declare(self.opts.amqp_url, topology.job_layout(self.cfg.job_id, stages=(dest,)), self.opts.tls)
            self.declared.add(dest)
        body = msg.copy(activations=output, model_version=self.stage.version).encode()
        self.relayed[key] = _Relayed(delivery, msg.client_id, msg.seq, msg.train)
        self.metrics.bytes.labels(self.metrics.role, "sent").inc(len(body))
        self.broker.publish(topology.activations_exchange(self.cfg.job_id),
                            topology.forward_routing_key(self.party, dest), body,
                            message_id=key, correlation_id=key, reply_to=self.party)
        self.metrics.in_flight.labels(self.metrics.role).set(len(self.relayed))

    def _relay_backward(self, msg: wire.Backward, delivery: Delivery) -> None:
        pending = self.relayed.pop(delivery.correlation_id or "", None)
        if pending is None:  # an answer we already relayed (re-sent downstream): nothing to do
            self.counts["duplicates"] += 1
            self._done(delivery, None)
            return
        if not pending.train:
            reply = msg.copy(client_id=pending.client, model_version=self.stage.version)
            self._done(pending.delivery, self._reply(reply, pending.delivery))
        else:
            key = f"{pending.delivery.correlation_id}>{self.party}"
            validate.check_backward(msg, job_id=self.cfg.job_id, shape=self.stage.output_shape(key))
            started = time.perf_counter()
            grad_input, stale = self.stage.backward(key, msg.grad)
            self.metrics.step_time.labels(self.metrics.role).observe(time.perf_counter() - started)
            self.metrics.staleness.labels(self.metrics.role).observe(stale)
            reply = wire.Backward(job_id=msg.job_id, client_id=pending.client, seq=pending.seq,
                                  model_version=self.stage.version, grad=grad_input, loss=msg.loss,
                                  correct=msg.correct, skipped=msg.skipped)
            self._applied(pending.client, pending.seq, reply, pending.delivery, len(msg.grad))
        self._done(delivery, None)
        self.metrics.in_flight.labels(self.metrics.role).set(len(self.relayed))

    # ---- vertical split: join the parties' parts of a batch ------------------------------

    def _vertical_part(self, msg: wire.Forward, delivery: Delivery) -> None:
        assert self.vertical is not None
        if msg.train and self.vertical.was_closed(msg.seq) == "skipped":
            self._skip_vertical(msg.seq, [(msg, delivery)])
            return
        if not msg.train:  # evaluation parts join under their own key space
            msg = msg.copy(seq=-1 - msg.seq)
        parts = self.vertical.add(msg, delivery)
        if parts is None:
            return
        joined = join([m.activations for m, _ in parts], self.cfg.combine)          # (B, 640)
        first = parts[0][0]
        labels = self._labels(first)
        if not first.train:
            loss_sum, correct = evaluate_correct(self.stage.infer(joined), labels)
            self._count_eval(first.client_id, -1 - first.seq, correct, len(labels))
            for m, d in parts:
                reply = wire.Backward(job_id=m.job_id, client_id=m.client_id, seq=-1 - m.seq,
                                      loss=loss_sum / len(labels), correct=correct)
                self._done(d, self._reply(reply, d))
            return
        result = self._timed_step(joined, labels)
        widths = [m.activations.shape[1] for m, _ in parts]
        for (m, d), grad in zip(parts, split_gradient(result.grad_input, widths, self.cfg.combine)):
            reply = wire.Backward(job_id=m.job_id, client_id=m.client_id, seq=m.seq, model_version=self.stage.version,
                                  grad=grad.contiguous(), loss=result.loss, correct=result.correct)
            self._applied(m.client_id, m.seq, reply, d, len(labels))

    def _skip_vertical(self, seq: int, parts: list[tuple[wire.Forward, Any]]) -> None:
        """Policy for a late or missing party: the batch is skipped; the parties that sent are told."""
        log.warning("%s: skipping batch %d: %d of %d parties sent their part in time", self.party, seq,
                    len(parts), self.cfg.vertical_parts)
        self.metrics.skipped.labels(self.metrics.role, "party_timeout").inc()
        self.metrics.batches.labels(self.metrics.role, "skipped").inc()
        self.counts["skipped"] += 1
        for m, d in parts:
            if m.train:
                self.last_applied[m.client_id] = max(seq, self.last_applied.get(m.client_id, -1))
            reply = wire.Backward(job_id=m.job_id, client_id=m.client_id, seq=m.seq if m.train else -1 - m.seq,
                                  skipped=True, correct=0)
            self._done(d, self._reply(reply, d))

    # ---- bottom exchange (average / handoff) ----------------------------------------------

    def _send_weights(self, sends: list[Any]) -> None:
        assert self.broker is not None
        for s in sends:
            if f"party:{s.reply_to}" not in self.declared:  # the next owner may not have started yet
                declare(self.opts.amqp_url, topology.client_layout(self.cfg.job_id, s.reply_to), self.opts.tls)
                self.declared.add(f"party:{s.reply_to}")
            body = wire.Weights(job_id=self.cfg.job_id, client_id=self.party, seq=s.epoch, tensors=s.tensors).encode()
            self.unconfirmed.append(self.broker.publish(
                topology.gradients_exchange(self.cfg.job_id), topology.reply_routing_key(s.reply_to), body,
                message_id=f"{s.correlation_id}:weights", correlation_id=s.correlation_id))

    # ---- durability -----------------------------------------------------------------------

    def dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Set a message aside in the dead-letter queue with its reason, then ack it."""
        assert self.broker is not None
        log.warning("%s: dead-lettering %s from %s: %s: %s", self.party, delivery.message_id, delivery.user_id,
                    reason, detail)
        self.metrics.reject(reason)
        self.counts[f"rejected_{reason}"] += 1
        future = self.broker.publish(
            topology.dead_letter_exchange(self.cfg.job_id), "", delivery.body,
            message_id=f"dead:{delivery.message_id}:{time.time_ns()}",
            headers={"x-splitmq-reason": reason, "x-splitmq-detail": detail[:500],
                     "x-splitmq-queue": delivery.queue, "x-splitmq-user": delivery.user_id or "",
                     "x-splitmq-message-id": delivery.message_id or ""})
        broker, party = self.broker, self.party
        future.add_done_callback(lambda f: broker.ack(delivery) if f.exception() is None
                                 else log.error("%s: could not dead-letter %s: %s", party, delivery.message_id,
                                                f.exception()))

    def _maybe_checkpoint(self, *, idle: bool) -> None:
        if self.ckpt_path is None or not len(self.acks):
            return
        due = len(self.acks) >= self.cfg.checkpoint_every or time.monotonic() - self._last_checkpoint > CHECKPOINT_INTERVAL_S
        if due or idle:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Wait for outstanding replies, write the checkpoint, then ack what it covers."""
        if self.ckpt_path is None or self.broker is None:
            return
        for future in self.unconfirmed:
            # No timeout: the broker re-sends across reconnects (a broker restart or network cut
            # may take minutes), and a checkpoint must never cover a reply the broker lacks.
            try:
                future.result()
            except Unroutable as exc:  # the client's reply queue is gone: nobody left to answer
                log.warning("%s: reply dropped: %s", self.party, exc)
        self.unconfirmed.clear()
        checkpoint.save(self.ckpt_path, {
            "stage": self.stage.state(), "last_applied": dict(self.last_applied), "config": self.cfg.agreed(),
            "rounds": self.rounds.state() if self.rounds is not None else {},
        })
        self._last_checkpoint = time.monotonic()
        self.acks.release()

    def summary(self, seconds: float) -> dict[str, Any]:
        steps = sorted(self.step_times) or [float("nan")]
        return {
            "party": self.party, "seconds": seconds, "batches_applied": self.counts["applied"],
            "samples": self.counts["samples"], "duplicates": self.counts["duplicates"],
            "skipped": self.counts["skipped"], "version": self.stage.version, "last_applied": dict(self.last_applied),
            "rejected": {k[len("rejected_"):]: v for k, v in self.counts.items() if k.startswith("rejected_")},
            "step_p50_s": steps[len(steps) // 2], "step_p99_s": steps[min(len(steps) - 1, int(len(steps) * 0.99))],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "test_accuracy": self.test_accuracy,
            "losses": self.losses,
        }


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("server", help="run a party holding the top segment (or a middle hop)")
    runtime.add_job_options(p)
    p.add_argument("--stage", default=topology.TOP_STAGE, help="this stage's name (its queue); default top")
    p.add_argument("--segment", type=int, default=-1, help="which model segment we hold (default: the last)")
    p.add_argument("--next-stage", default=None,
                   help=f"middle hop: the stage to forward to ({SENDER_HEAD} = the sender's own head, U-shaped)")
    p.add_argument("--vertical-timeout", type=float, default=30.0,
                   help="vertical split: seconds to wait for a batch's missing parts before skipping it")
    p.add_argument("--sync-timeout", type=float, default=SYNC_TIMEOUT_S,
                   help="bottom averaging: seconds before a round closes without the owners still absent")
    p.add_argument("--private-outputs", action="store_true",
                   help="U-shaped head: never send loss or accuracy back (they stay in this party's metrics)")
    p.add_argument("--require-identity", action="store_true",
                   help="accept only messages whose broker-validated user_id names their client")
    p.add_argument("--prefetch", type=int, default=256, help="unacked deliveries the broker may send ahead")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = runtime.job_config(args)
    torch.set_num_threads(1)
    metrics = Metrics("trainer" if args.next_stage is None else "stage")
    if args.metrics_port is not None:
        serve(args.metrics_port)
    opts = TrainerOptions(amqp_url=args.amqp_url, tls=runtime.tls_options(args), checkpoint_dir=args.checkpoint_dir,
                          require_identity=args.require_identity, prefetch=args.prefetch,
                          run_dir=args.run_dir or f"runs/{cfg.job_id}", stage=args.stage, segment=args.segment,
                          next_stage=args.next_stage, vertical_timeout_s=args.vertical_timeout,
                          private_outputs=args.private_outputs, sync_timeout_s=args.sync_timeout)
    try:
        trainer = Trainer(cfg, opts, metrics=metrics, stop=runtime.StopFlag().install())
        summary = trainer.run()
    except (ConfigError, BrokerError) as exc:
        log.error("%s: %s", args.stage, exc)
        return 2
    runtime.write_json(args.summary_json, summary)
    log.info("%s: stopped (%s) after %d batches", args.stage, trainer.stop.reason or "done", summary["batches_applied"])
    return 0
