"""``splitmq server``: the trainer holding the top segment (and, by default, the loss).

It consumes activations with manual acks and a bounded prefetch, applies each client's
batches once and in order, publishes the gradient to the sender's reply queue, and acks an
activation only once its effect is safe: after the gradient's publish is confirmed, and,
with a checkpoint directory, after a checkpoint holds it. Bad input is dead-lettered with
its reason; a batch the handler keeps failing on reaches the dead-letter queue through the
queue's delivery limit.
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

from shared import aggregate, checkpoint, data, models, topology, validate, wire
from shared.broker import Broker, Delivery, declare
from shared.config import JobConfig, differences
from shared.errors import BrokerError, ConfigError, DecodeError, RejectedMessage
from shared.metrics import Metrics, serve
from shared.stage import Stage, evaluate_correct
from workers import runtime

log = logging.getLogger(__name__)

#: Gradients kept per client to answer a re-sent batch (its gradient may have been lost).
RESEND_CACHE = 64
#: Checkpoint at least this often while holding acks, however few batches came.
CHECKPOINT_INTERVAL_S = 5.0
#: A bottom-averaging round closes with whoever reported once it is this old.
SYNC_TIMEOUT_S = 120.0
PARTY = "trainer"


@dataclass(frozen=True)
class TrainerOptions:
    amqp_url: str
    tls: dict[str, str] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    require_identity: bool = False
    prefetch: int = 256
    run_dir: str | None = None


class Trainer:
    """Consumes forward messages for the top stage and answers each with a gradient."""

    def __init__(self, cfg: JobConfig, opts: TrainerOptions, *, metrics: Metrics,
                 stop: runtime.StopFlag | None = None) -> None:
        self.cfg, self.opts, self.metrics = cfg, opts, metrics
        self.stop = stop or runtime.StopFlag()
        top = models.build_segments(cfg.model, cfg.cuts, cfg.seed)[-1]
        self.stage = Stage(top, lr=cfg.lr, momentum=cfg.momentum, input_grad=True)
        self.limits = validate.Limits(cfg.job_id, tuple(models.cut_shapes(cfg.model, cfg.cuts)[-1]), cfg.batch_size)
        self.num_classes = models.get_spec(cfg.model).num_classes
        self.labels_by_id = self._label_table() if cfg.label_source == "top" else None
        self.last_applied: dict[str, int] = {}
        self.recent: dict[str, collections.OrderedDict[int, bytes]] = collections.defaultdict(collections.OrderedDict)
        self.rounds: dict[int, dict[str, Any]] = {}          # bottom averaging: epoch -> contributions
        self.round_started: dict[int, float] = {}
        self.round_results: dict[int, dict[str, torch.Tensor]] = {}
        self.eval_counts: dict[str, list[int]] = {}
        self.unconfirmed: list[Future[None]] = []
        self.ckpt_path = checkpoint.path_for(opts.checkpoint_dir, PARTY) if opts.checkpoint_dir else None
        self.history = runtime.History(opts.run_dir, PARTY)
        self.inbox = runtime.Inbox()
        self.step_times: list[float] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.broker: Broker | None = None
        self._last_checkpoint = time.monotonic()

    def _label_table(self) -> torch.Tensor:
        """Labels by global sample id, for runs where labels never leave the trainer."""
        ds = data.load(self.cfg.dataset, self.cfg.data_dir, self.cfg.test_fraction)
        ids = torch.cat([ds.train.ids, ds.test.ids])
        table = torch.full((int(ids.max()) + 1,), -1, dtype=torch.int64)
        table[ids] = torch.cat([ds.train.y, ds.test.y])
        return table

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
        self.rounds = {int(k): v for k, v in state["rounds"].items()}
        self.round_results = {int(k): v for k, v in state["round_results"].items()}
        log.info("trainer: resumed from checkpoint (version %d, clients %s)", self.stage.version, self.last_applied)

    def connect(self) -> None:
        job = self.cfg.job_id
        declare(self.opts.amqp_url, topology.job_layout(job), self.opts.tls)
        self.broker = Broker(self.opts.amqp_url, name="trainer", prefetch=self.opts.prefetch, tls=self.opts.tls,
                             on_reconnect=lambda: self.metrics.reconnects.labels("trainer").inc())
        self.broker.start()
        self.acks = runtime.HeldAcks(self.broker, hold=self.ckpt_path is not None)
        self.broker.consume(topology.forward_queue(job), self.inbox.put)
        log.info("trainer: serving job %s on %s", job, runtime.redact(self.opts.amqp_url))

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
                    self._close_overdue_rounds()
                self._maybe_checkpoint(idle=delivery is None)
        finally:
            self.checkpoint()
            self.broker.close()
        return self.summary(time.monotonic() - started)

    # ---- messages -------------------------------------------------------------------------

    def handle(self, delivery: Delivery) -> None:
        """Decode, validate and dispatch one delivery; never raises for bad input."""
        assert self.broker is not None
        self.metrics.bytes.labels("trainer", "received").inc(len(delivery.body))
        try:
            msg = wire.decode(delivery.body)
            validate.check_identity(delivery.user_id, msg.client_id, delivery.reply_to,
                                    require=self.opts.require_identity)
            if isinstance(msg, wire.Forward) and msg.train:
                self._train(msg, delivery)
            elif isinstance(msg, wire.Forward):
                self._evaluate(msg, delivery)
            elif isinstance(msg, wire.Hello):
                self._hello(msg, delivery)
            elif isinstance(msg, wire.Weights):
                self._weights(msg, delivery)
            else:
                raise RejectedMessage("kind", f"a trainer does not take {msg.kind.value} messages")
        except DecodeError as exc:
            self.dead_letter(delivery, "decode", str(exc))
        except RejectedMessage as exc:
            self.dead_letter(delivery, exc.reason, exc.detail)
        except Exception:
            # Not the sender's fault as far as we can tell: return it; the queue's delivery
            # limit dead-letters it if it keeps failing.
            log.exception("trainer: handler failed on %s (delivery %s); returning it to the queue",
                          delivery.message_id, "redelivered" if delivery.redelivered else "first")
            self.metrics.reject("handler_error")
            self.broker.requeue(delivery)

    def _reply(self, msg: wire.Message, delivery: Delivery, body: bytes | None = None) -> Future[None]:
        assert self.broker is not None
        target = delivery.reply_to or msg.client_id
        body = body if body is not None else msg.encode()
        self.metrics.bytes.labels("trainer", "sent").inc(len(body))
        return self.broker.publish(topology.gradients_exchange(self.cfg.job_id), topology.reply_routing_key(target),
                                   body, message_id=f"{delivery.message_id}:reply",
                                   correlation_id=delivery.correlation_id)

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
            broker = self.broker
            future.add_done_callback(lambda f: broker.ack(delivery) if f.exception() is None
                                     else log.error("trainer: reply to %s failed: %s", delivery.message_id, f.exception()))

    def _train(self, msg: wire.Forward, delivery: Delivery) -> None:
        validate.check_forward(msg, self.limits)
        client = msg.client_id
        last = self.last_applied.get(client, -1)
        validate.check_sequence(msg.seq, last)
        if msg.seq <= last:  # a re-sent batch we already applied: answer again, apply nothing
            self.counts["duplicates"] += 1
            self.metrics.batches.labels("trainer", "duplicate").inc()
            cached = self.recent[client].get(msg.seq)
            self._done(delivery, self._reply(msg, delivery, cached) if cached else None)
            return
        labels = self._labels(msg)
        started = time.perf_counter()
        result = self.stage.loss_step(msg.activations, labels)
        step = time.perf_counter() - started
        self.last_applied[client] = msg.seq
        reply = wire.Backward(job_id=msg.job_id, client_id=client, seq=msg.seq, model_version=self.stage.version,
                              grad=result.grad_input, loss=result.loss, correct=result.correct)
        body = reply.encode()
        cache = self.recent[client]
        cache[msg.seq] = body
        while len(cache) > RESEND_CACHE:
            cache.popitem(last=False)
        self._done(delivery, self._reply(reply, delivery, body))
        self.step_times.append(step)
        self.counts["applied"] += 1
        self.counts["samples"] += len(labels)
        m = self.metrics
        m.step_time.labels("trainer").observe(step)
        m.batches.labels("trainer", "applied").inc()
        m.samples.labels("trainer").inc(len(labels))
        m.loss.labels("trainer").set(result.loss)
        m.last_progress.labels("trainer").set(time.time())
        m.clients.labels("trainer").set(len(self.last_applied))
        if self.counts["applied"] % 20 == 0:
            self.history.record(epoch=-1, seq=self.counts["applied"], loss=result.loss, samples=self.counts["samples"])

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
        validate.check_forward(msg, self.limits)
        labels = self._labels(msg)
        loss_sum, correct = evaluate_correct(self.stage.infer(msg.activations), labels)
        counts = self.eval_counts.setdefault(msg.client_id, [0, 0])
        if msg.seq == 0:
            counts[:] = [0, 0]
        counts[0] += correct
        counts[1] += len(labels)
        total = sum(c[1] for c in self.eval_counts.values())
        self.metrics.test_accuracy.labels("trainer").set(sum(c[0] for c in self.eval_counts.values()) / total)
        self.metrics.batches.labels("trainer", "evaluated").inc()
        reply = wire.Backward(job_id=msg.job_id, client_id=msg.client_id, seq=msg.seq,
                              model_version=self.stage.version, loss=loss_sum / len(labels), correct=correct)
        self._done(delivery, self._reply(reply, delivery))

    def _hello(self, msg: wire.Hello, delivery: Delivery) -> None:
        mine = self.cfg.agreed()
        diffs = differences(mine, dict(msg.spec))
        if diffs:
            log.warning("trainer: client %s has a different job config: %s", msg.client_id, "; ".join(diffs))
        else:
            log.info("trainer: client %s joined (last applied seq %d)", msg.client_id,
                     self.last_applied.get(msg.client_id, -1))
        reply = wire.Hello(job_id=self.cfg.job_id, client_id=msg.client_id, seq=msg.seq, spec=mine,
                           error="; ".join(diffs))
        self._done(delivery, self._reply(reply, delivery))

    # ---- bottom averaging (bottom_sync = "average") -------------------------------------

    def _weights(self, msg: wire.Weights, delivery: Delivery) -> None:
        if self.cfg.bottom_sync != "average":
            raise RejectedMessage("kind", "bottom averaging is off for this job")
        epoch = msg.seq
        if epoch in self.round_results:  # a late or repeated contribution: hand out the result
            self._send_average(epoch, {msg.client_id: (delivery.reply_to or msg.client_id, delivery.correlation_id)})
        else:
            entries = self.rounds.setdefault(epoch, {})
            self.round_started.setdefault(epoch, time.monotonic())
            entries[msg.client_id] = {"tensors": {k: v.clone() for k, v in msg.tensors.items()},
                                      "n": msg.num_samples, "reply_to": delivery.reply_to or msg.client_id,
                                      "cid": delivery.correlation_id or ""}
            if len(entries) >= self.cfg.num_clients:
                self._close_round(epoch)
        self._done(delivery, None)

    def _close_round(self, epoch: int) -> None:
        entries = self.rounds.pop(epoch)
        self.round_started.pop(epoch, None)
        states = [e["tensors"] for e in entries.values()]
        self.round_results[epoch] = aggregate.weighted_average(states, [max(1, e["n"]) for e in entries.values()])
        for old in [e for e in self.round_results if e < epoch - 1]:
            del self.round_results[old]
        log.info("trainer: averaged the bottoms of %d clients for epoch %d", len(entries), epoch)
        self._send_average(epoch, {c: (e["reply_to"], e["cid"]) for c, e in entries.items()})

    def _send_average(self, epoch: int, targets: dict[str, tuple[str, str]]) -> None:
        assert self.broker is not None
        body = wire.Weights(job_id=self.cfg.job_id, client_id=PARTY, seq=epoch,
                            tensors=self.round_results[epoch]).encode()
        for client, (reply_to, cid) in targets.items():
            self.unconfirmed.append(self.broker.publish(
                topology.gradients_exchange(self.cfg.job_id), topology.reply_routing_key(reply_to), body,
                message_id=f"{client}:weights:{epoch}:reply", correlation_id=cid))

    def _close_overdue_rounds(self) -> None:
        for epoch, since in list(self.round_started.items()):
            if time.monotonic() - since > SYNC_TIMEOUT_S:
                log.warning("trainer: closing the epoch-%d average without %d absent client(s)", epoch,
                            self.cfg.num_clients - len(self.rounds[epoch]))
                self._close_round(epoch)

    # ---- durability -----------------------------------------------------------------------

    def dead_letter(self, delivery: Delivery, reason: str, detail: str) -> None:
        """Set a message aside in the dead-letter queue with its reason, then ack it."""
        assert self.broker is not None
        log.warning("trainer: dead-lettering %s from %s: %s: %s", delivery.message_id, delivery.user_id, reason, detail)
        self.metrics.reject(reason)
        self.counts[f"rejected_{reason}"] += 1
        future = self.broker.publish(
            topology.dead_letter_exchange(self.cfg.job_id), "", delivery.body,
            message_id=f"dead:{delivery.message_id}:{time.time_ns()}",
            headers={"x-splitmq-reason": reason, "x-splitmq-detail": detail[:500],
                     "x-splitmq-queue": delivery.queue, "x-splitmq-user": delivery.user_id or "",
                     "x-splitmq-message-id": delivery.message_id or ""})
        broker = self.broker
        future.add_done_callback(lambda f: broker.ack(delivery) if f.exception() is None
                                 else log.error("trainer: could not dead-letter %s: %s", delivery.message_id, f.exception()))

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
            future.result(timeout=60)
        self.unconfirmed.clear()
        checkpoint.save(self.ckpt_path, {
            "stage": self.stage.state(), "last_applied": dict(self.last_applied), "config": self.cfg.agreed(),
            "rounds": dict(self.rounds), "round_results": dict(self.round_results),
        })
        self._last_checkpoint = time.monotonic()
        self.acks.release()

    def summary(self, seconds: float) -> dict[str, Any]:
        steps = sorted(self.step_times) or [float("nan")]
        return {
            "seconds": seconds, "batches_applied": self.counts["applied"], "samples": self.counts["samples"],
            "duplicates": self.counts["duplicates"], "version": self.stage.version,
            "last_applied": dict(self.last_applied),
            "rejected": {k[len("rejected_"):]: v for k, v in self.counts.items() if k.startswith("rejected_")},
            "step_p50_s": steps[len(steps) // 2], "step_p99_s": steps[min(len(steps) - 1, int(len(steps) * 0.99))],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("server", help="run the trainer holding the top segment")
    runtime.add_job_options(p)
    p.add_argument("--require-identity", action="store_true",
                   help="accept only messages whose broker-validated user_id names their client")
    p.add_argument("--prefetch", type=int, default=256, help="unacked deliveries the broker may send ahead")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = runtime.job_config(args)
    torch.set_num_threads(1)
    metrics = Metrics("trainer")
    if args.metrics_port is not None:
        serve(args.metrics_port)
    opts = TrainerOptions(amqp_url=args.amqp_url, tls=runtime.tls_options(args), checkpoint_dir=args.checkpoint_dir,
                          require_identity=args.require_identity, prefetch=args.prefetch,
                          run_dir=args.run_dir or f"runs/{cfg.job_id}")
    trainer = Trainer(cfg, opts, metrics=metrics, stop=runtime.StopFlag().install())
    try:
        summary = trainer.run()
    except (ConfigError, BrokerError) as exc:
        log.error("trainer: %s", exc)
        return 2
    runtime.write_json(args.summary_json, summary)
    log.info("trainer: stopped (%s) after %d batches", trainer.stop.reason or "done", summary["batches_applied"])
    return 0
