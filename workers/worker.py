"""``splitmq worker``: a data owner running the bottom segment.

It publishes activation batches (persistent, confirmed, mandatory) with up to
``max_in_flight`` outstanding, applies each batch's gradient once, and resumes from its
checkpoint after a crash: batches are numbered per client, so the trainer and this worker
both know which ones were applied. Gradient messages are acked only once a checkpoint
holds their effect.
"""
from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from splitmq.shared import checkpoint, data, models, schedule, staleness, topology, validate, wire
from splitmq.shared.broker import Broker, Delivery, declare, queue_depth
from splitmq.shared.config import JobConfig, differences
from splitmq.shared.errors import AccessRefused, BrokerError, ConfigError, DecodeError, RejectedMessage, Unroutable
from splitmq.shared.metrics import Metrics, serve
from splitmq.shared.stage import Stage
from splitmq.workers import runtime

log = logging.getLogger(__name__)

#: Log a "still waiting" line this often while the trainer is silent.
WAIT_LOG_S = 15.0
#: While waiting (for a restarting trainer, a round, a turn), checkpoint at least this often so
#: held gradient acks never approach the broker's consumer_timeout, which would close our channel.
IDLE_CHECKPOINT_S = 5.0
#: Pause between hellos while the trainer's queue does not exist yet.
JOIN_RETRY_S = 2.0


@dataclass(frozen=True)
class WorkerOptions:
    client_id: str
    client_index: int
    amqp_url: str
    tls: dict[str, str] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    run_dir: str | None = None
    evaluate: bool = True
    join_timeout_s: float = 600.0
    dest_stage: str = topology.TOP_STAGE  # the stage our activations go to ("mid" in a U-shaped run)


@dataclass
class _InFlight:
    sent_at: float
    size: int


class Worker:
    """Drives one client's training: data -> bottom stage -> broker, gradients -> updates."""

    def __init__(self, cfg: JobConfig, opts: WorkerOptions, *, metrics: Metrics,
                 stop: runtime.StopFlag | None = None) -> None:
        topology.check_name("client", opts.client_id)
        self.cfg, self.opts, self.metrics = cfg, opts, metrics
        self.stop = stop if stop is not None else runtime.StopFlag()
        dataset = data.load(cfg.dataset, cfg.data_dir, cfg.test_fraction)
        if cfg.vertical_parts:  # every party holds all samples, but only its own block of columns
            columns = models.column_groups(cfg.vertical_parts)[opts.client_index]
            self.train = data.Split(dataset.train.x[:, columns], dataset.train.y, dataset.train.ids)
            self.test = data.Split(dataset.test.x[:, columns], dataset.test.y, dataset.test.ids)
            bottom = models.vertical_segments(cfg.vertical_parts, cfg.seed)[0][opts.client_index]
            self.order_seed = cfg.seed  # parties must walk the samples in the same order
        else:
            self.train = data.shard(dataset.train, opts.client_index, cfg.num_clients)
            self.test = dataset.test
            bottom = models.build_segments(cfg.model, cfg.cuts, cfg.seed)[0]
            self.order_seed = cfg.seed + opts.client_index
        self.stage = Stage(bottom, lr=cfg.lr, momentum=cfg.momentum, input_grad=False,
                           schedule=schedule.for_party(cfg, opts.client_index, len(dataset.train.y)),
                           correction=staleness.make(cfg.staleness, dc_lambda=cfg.dc_lambda),
                           stash_weights=cfg.max_in_flight > 1)
        self.cut_shape = cfg.cut_shapes()[0]
        self.batches_per_epoch = len(data.batch_order(len(self.train.y), cfg.batch_size, 0, 0))
        self.total = cfg.epochs * self.batches_per_epoch
        self.last_applied = -1       # every seq <= this has had its gradient applied
        self.synced_epoch = -1       # last epoch whose end (average/hand-off, eval) is done
        self.handoff_epoch = -1      # last epoch started from a hand-off (bottom_sync = "handoff")
        self.in_flight: dict[int, _InFlight] = {}
        self.next_seq = 0
        self.ckpt_path = checkpoint.path_for(opts.checkpoint_dir, opts.client_id) if opts.checkpoint_dir else None
        self.history = runtime.History(opts.run_dir, opts.client_id)
        self.inbox = runtime.Inbox()
        self.replies: dict[str, wire.AnyMessage] = {}  # non-training replies by correlation id
        self.round_trips: list[float] = []
        self.losses: dict[int, float] = {}  # per applied batch, as the trainer reported it
        self.early: dict[int, wire.Backward] = {}
        self.unconfirmed: list[Future[None]] = []
        self.stats: dict[str, Any] = {"samples": 0, "duplicates": 0, "skipped": 0, "rejected": 0, "max_staleness": 0, "loss": float("nan"),
                      "test_accuracy": float("nan"), "bytes_sent": 0, "bytes_received": 0}
        self._orders: dict[int, list[torch.Tensor]] = {}
        self._username = runtime.broker_username(opts.amqp_url)
        self.broker: Broker | None = None
        self._last_checkpoint = time.monotonic()

    # ---- set-up -----------------------------------------------------------------------

    def restore(self) -> bool:
        """Load this client's checkpoint if there is one; True when resumed."""
        state = checkpoint.load(self.ckpt_path) if self.ckpt_path else None
        if state is None:
            return False
        theirs = state["config"]
        mine = self.cfg.agreed()
        if differences(mine, theirs):
            raise ConfigError("checkpoint was written for another job: " + "; ".join(differences(mine, theirs)))
        self.stage.load_state(state["stage"])
        self.last_applied = int(state["last_applied"])
        self.synced_epoch = int(state["synced_epoch"])
        self.handoff_epoch = int(state["handoff_epoch"])
        self.next_seq = self.last_applied + 1
        log.info("%s: resumed from checkpoint at seq %d (epoch %d)", self.opts.client_id,
                 self.last_applied, self.epoch_of(self.next_seq))
        return True

    def connect(self) -> None:
        """Make sure our reply queue exists, connect, and consume it."""
        job, me = self.cfg.job_id, self.opts.client_id
        try:
            # Our reply queue, and our destination's queue so that we may start before it does.
            declare(self.opts.amqp_url, topology.job_layout(job, stages=(self.opts.dest_stage,), parties=(me,)),
                    self.opts.tls)
        except AccessRefused:  # a least-privilege client: the admin created the queue (broker add-client)
            queue_depth(self.opts.amqp_url, topology.reply_queue(job, me), self.opts.tls)
        self.broker = Broker(self.opts.amqp_url, name=f"worker-{me}", tls=self.opts.tls,
                             prefetch=self.cfg.checkpoint_every + self.cfg.max_in_flight + 32,
                             on_reconnect=lambda: self.metrics.reconnects.labels("worker").inc())
        self.broker.start()
        self.broker.consume(topology.reply_queue(job, me), self.inbox.put)
        self.acks = runtime.HeldAcks(self.broker, hold=self.ckpt_path is not None)

    def join(self) -> None:
        """Exchange job specs with the trainer; fail at start if they disagree.

        Raises:
            ConfigError: the trainer's job spec differs (the message lists the fields).
            BrokerError: no trainer answered within the join timeout.
        """
        mine = self.cfg.agreed()
        deadline = time.monotonic() + self.opts.join_timeout_s
        reply: wire.AnyMessage | None = None
        while reply is None:
            cid = f"{self.opts.client_id}:hello:{time.time_ns()}"
            sent = self._publish(wire.Hello(job_id=self.cfg.job_id, client_id=self.opts.client_id, seq=0, spec=mine), cid)
            try:
                sent.result(timeout=max(1.0, deadline - time.monotonic()))
                # Ask again now and then: a hello routed before the trainer's queue existed is lost.
                reply = self._await_reply(cid, JOIN_RETRY_S * 5, "the trainer's answer to our hello", required=False)
            except Unroutable:  # the trainer has not declared its queue yet
                log.info("%s: no trainer for job %s yet; asking again shortly", self.opts.client_id, self.cfg.job_id)
                self.stop.wait(JOIN_RETRY_S)
            if self.stop:
                raise InterruptedError("stopped while waiting for the trainer")
            if reply is None and time.monotonic() > deadline:
                raise BrokerError(f"no trainer answered for job {self.cfg.job_id!r} within "
                                  f"{self.opts.join_timeout_s:.0f}s: is `splitmq server` running?")
        assert isinstance(reply, wire.Hello)
        diffs = differences(mine, dict(reply.spec))
        if diffs or reply.error:
            raise ConfigError(f"job config disagrees with the trainer's: {'; '.join(diffs) or reply.error}")
        log.info("%s: joined job %s (cut shape %s)", self.opts.client_id, self.cfg.job_id, self.cut_shape)

    # ---- the loop ---------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the last epoch (or until stopped); returns the run summary."""
        self.restore()
        self.connect()
        try:
            self.join()
            started = time.monotonic()
            self.stats["started_at"] = time.time()
            applied_at_start = self.last_applied
            while not self.stop:
                self._after_progress()
                if self.last_applied >= self.total - 1:
                    break
                self._fill_window()
                delivery = self.inbox.get()
                if delivery is not None:
                    self._handle(delivery)
                else:
                    self._check_health()
                    self._checkpoint_if_idle()
            self.stats["finished_at"] = time.time()
            return self.summary(time.monotonic() - started, self.last_applied - applied_at_start)
        finally:
            self._checkpoint()
            if self.broker:
                self.broker.close()

    def epoch_of(self, seq: int) -> int:
        return seq // self.batches_per_epoch

    def _batch(self, seq: int) -> torch.Tensor:
        epoch, i = divmod(seq, self.batches_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: data.batch_order(len(self.train.y), self.cfg.batch_size,
                                                    self.order_seed, epoch)}
        return self._orders[epoch][i]

    def _fill_window(self) -> None:
        """Send batches until K are in flight; never run ahead into an epoch not yet begun."""
        current_epoch = self.epoch_of(self.last_applied + 1)
        while (len(self.in_flight) < self.cfg.max_in_flight and self.next_seq < self.total
               and self.epoch_of(self.next_seq) == current_epoch and not self.stop):
            self._send(self.next_seq)
            self.next_seq += 1

    def _send(self, seq: int) -> None:
        idx = self._batch(seq)
        x, y, ids = self.train.x[idx], self.train.y[idx], self.train.ids[idx]
        activations = self.stage.forward(seq, x)                        # (B, *cut_shape)
        msg = wire.Forward(job_id=self.cfg.job_id, client_id=self.opts.client_id, seq=seq,
                           model_version=self.stage.version, activations=activations,
                           labels=y if self.cfg.label_source == "batch" else None, sample_ids=ids)
        self.in_flight[seq] = _InFlight(time.monotonic(), len(idx))
        early = self.early.pop(seq, None)
        if early is not None:  # replaying after a restart: its gradient already waits in our queue
            self._apply(early)
            return
        self._publish(msg, f"{self.opts.client_id}:{seq}")
        self.metrics.in_flight.labels("worker").set(len(self.in_flight))

    def _publish(self, msg: wire.Message, correlation_id: str) -> Future[None]:
        """Publish to our destination stage; a failed publish surfaces in ``_check_health``."""
        assert self.broker is not None
        body = msg.encode()
        future = self.broker.publish(topology.activations_exchange(self.cfg.job_id),
                            topology.forward_routing_key(self.opts.client_id, self.opts.dest_stage), body,
                            message_id=correlation_id, correlation_id=correlation_id,
                            reply_to=self.opts.client_id, user_id=self._username)
        self.stats["bytes_sent"] += len(body)
        self.metrics.bytes.labels("worker", "sent").inc(len(body))
        self.unconfirmed = [f for f in self.unconfirmed if not f.done() or f.exception() is not None]
        self.unconfirmed.append(future)
        return future

    def _handle(self, delivery: Delivery) -> None:
        """One reply: a gradient to apply, a duplicate to drop, or another kind of answer."""
        self.stats["bytes_received"] += len(delivery.body)
        self.metrics.bytes.labels("worker", "received").inc(len(delivery.body))
        try:
            msg = wire.decode(delivery.body)
            if isinstance(msg, wire.Backward) and delivery.correlation_id == f"{self.opts.client_id}:{msg.seq}":
                self._on_gradient(msg)
            else:
                self.replies[delivery.correlation_id or ""] = msg
        except (DecodeError, RejectedMessage) as exc:
            reason = exc.reason if isinstance(exc, RejectedMessage) else "decode"
            log.warning("%s: dead-lettering reply %s: %s", self.opts.client_id, delivery.message_id, exc)
            self.metrics.reject(reason)
            self.stats["rejected"] += 1
            assert self.broker is not None
            self.broker.reject(delivery)
            return
        self.acks.done(delivery)

    def _on_gradient(self, msg: wire.Backward) -> None:
        """Apply the first gradient of each batch; keep early ones; drop the rest."""
        if msg.seq <= self.last_applied or msg.seq in self.early or not 0 <= msg.seq < self.total:
            self.stats["duplicates"] += 1
            self.metrics.batches.labels("worker", "duplicate").inc()
        elif msg.seq not in self.in_flight:
            self.early[msg.seq] = msg  # redelivered from before a restart; applied when we reach it
        else:
            self._apply(msg)

    def _apply(self, msg: wire.Backward) -> None:
        pending = self.in_flight[msg.seq]
        if msg.skipped:  # the trainer gave this batch up (a vertical party was late): drop it
            self.stage.discard(msg.seq)
            del self.in_flight[msg.seq]
            self.last_applied = max(self.last_applied, msg.seq)
            self.stats["skipped"] += 1
            self.metrics.skipped.labels("worker", "party_timeout").inc()
            return
        validate.check_backward(msg, job_id=self.cfg.job_id, shape=(pending.size, *self.cut_shape))
        _, stale = self.stage.backward(msg.seq, msg.grad)
        del self.in_flight[msg.seq]
        self.last_applied = max(self.last_applied, msg.seq)
        rtt = time.monotonic() - pending.sent_at
        self.round_trips.append(rtt)
        self.stats["loss"] = msg.loss
        self.losses[msg.seq] = msg.loss
        self.stats["samples"] += pending.size
        self.stats["max_staleness"] = max(self.stats["max_staleness"], stale)
        m = self.metrics
        m.round_trip.labels("worker").observe(rtt)
        m.staleness.labels("worker").observe(stale)
        m.batches.labels("worker", "applied").inc()
        m.samples.labels("worker").inc(pending.size)
        m.loss.labels("worker").set(msg.loss)
        m.in_flight.labels("worker").set(len(self.in_flight))
        m.last_progress.labels("worker").set(time.time())
        m.epoch.labels("worker").set(self.epoch_of(msg.seq))
        if msg.seq % 10 == 0:
            self.history.record(epoch=self.epoch_of(msg.seq), seq=msg.seq, loss=msg.loss,
                                samples=self.stats["samples"])

    def _after_progress(self) -> None:
        """At an epoch's end: average bottoms (if configured), evaluate, checkpoint."""
        done = self.last_applied + 1
        at_epoch_end = done % self.batches_per_epoch == 0 and done > 0 and not self.in_flight
        epoch = done // self.batches_per_epoch - 1
        if at_epoch_end and epoch > self.synced_epoch:
            if self.cfg.bottom_sync == "average" and (epoch + 1) % self.cfg.sync_every == 0:
                self._average_bottoms(epoch)
            elif self.cfg.bottom_sync == "handoff":
                self._publish(self._weights_message(epoch), f"{self.opts.client_id}:handoff-out:{epoch}")
            self.synced_epoch = epoch
            if self.opts.evaluate:
                self._evaluate(epoch)
            self._checkpoint()
        elif self.ckpt_path and len(self.acks) >= self.cfg.checkpoint_every:
            self._checkpoint()
        upcoming = self.epoch_of(done)
        if (self.cfg.bottom_sync == "handoff" and done < self.total and not self.in_flight
                and upcoming > self.handoff_epoch and (upcoming, self.opts.client_index) != (0, 0)):
            self._receive_handoff(upcoming)

    def _weights_message(self, epoch: int) -> wire.Weights:
        return wire.Weights(job_id=self.cfg.job_id, client_id=self.opts.client_id, seq=epoch,
                            tensors=dict(self.stage.segment.state_dict()), num_samples=len(self.train.y))

    def _receive_handoff(self, epoch: int) -> None:
        """SplitNN's turn-taking: start this epoch from the previous owner's bottom."""
        reply = self._await_reply(f"{self.opts.client_id}:handoff:{epoch}", None, f"our turn (epoch {epoch})")
        if not isinstance(reply, wire.Weights):
            raise DecodeError(f"bad hand-off for epoch {epoch}")
        self.stage.segment.load_state_dict({k: v.clone() for k, v in reply.tensors.items()})
        self.handoff_epoch = epoch

    def _average_bottoms(self, epoch: int) -> None:
        """SplitFed-style: send our bottom to the trainer, adopt the sample-weighted average."""
        cid = f"{self.opts.client_id}:weights:{epoch}"
        msg = self._weights_message(epoch)
        self._publish(msg, cid)
        reply = self._await_reply(cid, None, f"the bottom average of epoch {epoch}")
        if not isinstance(reply, wire.Weights) or set(reply.tensors) != set(msg.tensors):
            raise DecodeError(f"bad bottom average for epoch {epoch}")
        self.stage.segment.load_state_dict({k: v.clone() for k, v in reply.tensors.items()})

    def _evaluate(self, epoch: int) -> None:
        """Test accuracy of (our bottom + the trainer's top) on the test split."""
        order = torch.arange(len(self.test.y)).split(self.cfg.batch_size)
        for i, idx in enumerate(order):
            out = self.stage.infer(self.test.x[idx])
            msg = wire.Forward(job_id=self.cfg.job_id, client_id=self.opts.client_id, seq=i,
                               model_version=self.stage.version, activations=out,
                               labels=self.test.y[idx] if self.cfg.label_source == "batch" else None,
                               sample_ids=self.test.ids[idx], train=False)
            self._publish(msg, f"{self.opts.client_id}:eval:{epoch}:{i}")
        correct = 0
        for i in range(len(order)):
            reply = self._await_reply(f"{self.opts.client_id}:eval:{epoch}:{i}", None, "evaluation results")
            assert isinstance(reply, wire.Backward)
            correct = -1 if reply.correct < 0 or correct < 0 else correct + reply.correct
        if correct < 0:  # a private head (U-shaped) keeps the accuracy to itself
            return
        acc = correct / len(self.test.y)
        self.stats["test_accuracy"] = acc
        self.metrics.test_accuracy.labels("worker").set(acc)
        self.history.record(epoch=epoch, seq=self.last_applied, loss=self.stats["loss"], test_accuracy=acc,
                            samples=self.stats["samples"])
        log.info("%s: epoch %d done, test accuracy %.4f", self.opts.client_id, epoch, acc)

    def _await_reply(self, correlation_id: str, timeout: float | None, what: str, *,
                     required: bool = True) -> Any:
        """Handle deliveries until the reply with ``correlation_id`` arrives.

        Returns None on timeout when the reply is not ``required``.

        Raises:
            BrokerError: ``timeout`` seconds passed (``required``), or the connection failed for good.
            InterruptedError: a stop was requested.
        """
        start = last_log = time.monotonic()
        while correlation_id not in self.replies:
            if self.stop:
                raise InterruptedError(f"stopped while waiting for {what}")
            delivery = self.inbox.get()
            if delivery is not None:
                self._handle(delivery)
                continue
            self._check_health()
            self._checkpoint_if_idle()
            now = time.monotonic()
            if timeout is not None and now - start > timeout:
                if not required:
                    return None
                raise BrokerError(f"no {what} within {timeout:.0f}s: is `splitmq server` running for job "
                                  f"{self.cfg.job_id!r}?")
            if now - last_log > WAIT_LOG_S:
                log.info("%s: still waiting for %s (%.0fs)", self.opts.client_id, what, now - start)
                last_log = now
        return self.replies.pop(correlation_id)

    def _check_health(self) -> None:
        """Raise if the connection failed for good or the broker refused one of our messages."""
        assert self.broker is not None
        self.broker.check()
        for future in self.unconfirmed:
            if future.done() and future.exception() is not None:
                raise BrokerError(f"the broker refused a message of ours: {future.exception()}")

    def _checkpoint(self) -> None:
        if self.ckpt_path is None or self.broker is None:
            return
        checkpoint.save(self.ckpt_path, {
            "stage": self.stage.state(), "last_applied": self.last_applied, "synced_epoch": self.synced_epoch,
            "handoff_epoch": self.handoff_epoch,
            "config": self.cfg.agreed(), "client_id": self.opts.client_id,
        })
        self._last_checkpoint = time.monotonic()
        self.acks.release()

    def _checkpoint_if_idle(self) -> None:
        if self.ckpt_path and len(self.acks) and time.monotonic() - self._last_checkpoint > IDLE_CHECKPOINT_S:
            self._checkpoint()

    def summary(self, seconds: float, batches: int) -> dict[str, Any]:
        rtts = sorted(self.round_trips) or [float("nan")]
        samples = self.stats["samples"]
        return {
            "client_id": self.opts.client_id, "epochs": self.cfg.epochs, "batches": batches,
            "samples": samples, "seconds": seconds, "samples_per_second": samples / seconds if seconds else 0.0,
            "max_in_flight": self.cfg.max_in_flight, "completed": self.last_applied == self.total - 1,
            "losses": [self.losses[k] for k in sorted(self.losses)],
            "round_trip_p50_s": rtts[len(rtts) // 2], "round_trip_p99_s": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))],
            **{k: v for k, v in self.stats.items() if k != "samples"},
        }


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("worker", help="run a data owner's bottom segment")
    runtime.add_job_options(p)
    p.add_argument("--client-id", required=True, help="this data owner's name (letters, digits, _ -)")
    p.add_argument("--client-index", type=int, default=0, help="which shard of the training data is ours")
    p.add_argument("--no-eval", action="store_true", help="skip the per-epoch test evaluation")
    p.add_argument("--join-timeout", type=float, default=600.0, help="seconds to wait for the trainer at start")
    p.add_argument("--dest-stage", default=topology.TOP_STAGE,
                   help="the stage our activations go to (default top; e.g. mid in a U-shaped run)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="CPU threads for the bottom segment (default 1: small devices, predictable timing)")
    p.add_argument("--pushgateway", help="push metrics to this Prometheus Pushgateway (edge devices behind NAT)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = runtime.job_config(args)
    torch.set_num_threads(max(1, args.torch_threads))
    metrics = Metrics("worker")
    if args.metrics_port is not None:
        serve(args.metrics_port)
    stop_pushing = None
    if args.pushgateway:
        from splitmq.shared.push import start_pushing
        stop_pushing = start_pushing(args.pushgateway, job="splitmq-worker", instance=args.client_id,
                                     registry=metrics.registry, interval_s=5.0)
    opts = WorkerOptions(client_id=args.client_id, client_index=args.client_index, amqp_url=args.amqp_url,
                         tls=runtime.tls_options(args), checkpoint_dir=args.checkpoint_dir,
                         run_dir=args.run_dir or f"runs/{cfg.job_id}", evaluate=not args.no_eval,
                         join_timeout_s=args.join_timeout, dest_stage=args.dest_stage)
    worker = Worker(cfg, opts, metrics=metrics, stop=runtime.StopFlag().install())
    try:
        summary = worker.run()
    except (ConfigError, BrokerError) as exc:
        log.error("%s: %s", args.client_id, exc)
        return 2
    except InterruptedError as exc:
        log.info("%s: %s", args.client_id, exc)
        return 0
    finally:
        if stop_pushing:
            stop_pushing()
    runtime.write_json(args.summary_json, summary)
    log.info("%s: done: %d samples in %.1fs (%.0f samples/s), test accuracy %.4f", args.client_id,
             summary["samples"], summary["seconds"], summary["samples_per_second"], summary["test_accuracy"])
    return 0
