"""The party loop without a transport: what the worker's and the trainer's loops cost per sample.

Between the hot loops (``bench.hotloops``: the parties' Stages alone) and the real processes
(``bench.cpujobs``: the loop, pika's I/O thread and the broker, sharing the cores) sits the loop
itself: gate, decode, validation, roles, ledger, outbox, encoding, metrics, checkpoints. Here the
very roles and loop a ``splitmq worker`` and a ``splitmq server`` build (``worker.build``,
``server.build``, ``Party``) train the job in two threads of this process over the in-memory broker
(``shared.transport.StubBroker``): no sockets, no pika, no RabbitMQ. Each thread's CPU
(its POSIX thread CPU clock) over the steady state (20%-80% of the samples, as
``bench.cputime``) is that party's loop with its Stage; less the hot loop, what the loop adds (its
own work, and its Stage's step running slower between messages than in a hot loop: docs/benchmarks.md);
the real process less this, what the transport and the shared cores add.

``least_trainer`` bounds what a leaner loop could save: the trainer's work per batch at its least
(decode a bundle and its parts, ``validate.check_forward``, ``Stage.loss_step``, encode each answer
and their bundle) on the bodies a worker sends, with no roles, ledger, outbox, acks or checkpoints.

Caveats, both small against the figures: the two threads share the GIL (waiting for it is not
CPU); the in-memory broker hands each message to its consumer on the sender's thread (a queue
put).
"""
from __future__ import annotations

import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

import torch

from splitmq.bench.common import BATCH_SIZE, THREADS, dataset
from splitmq.bench.cputime import Snapshot, window
from splitmq.shared import topology, validate, wire
from splitmq.shared.config import JobConfig
from splitmq.shared.transport import StubBroker
from splitmq.workers import assemble, server, worker
from splitmq.workers.party import Outcome, Party
from splitmq.workers.stats import Stats

#: Epochs of each run: long enough for a steady state of a few seconds.
EPOCHS = 12
#: A run that has not finished in this long failed.
RUN_TIMEOUT_S = 600.0
#: How often the sampler reads both threads' CPU and the samples applied.
PERIOD_S = 0.05


class _Thread:
    """One party's loop on its own thread, and how it ended."""

    def __init__(self, party: Party) -> None:
        self.party = party
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"loop-{party.opts.name}", daemon=True)

    def _run(self) -> None:
        try:
            self.outcome = self.party.run()
        except BaseException as exc:  # reported by run() below, with the party's name
            self.error = exc

    def cpu(self) -> float:
        """This thread's CPU seconds, to the nanosecond (``/proc`` counts in 10-ms ticks)."""
        assert self.thread.ident is not None
        return time.clock_gettime(time.pthread_getcpuclockid(self.thread.ident))


def run(model: str, dataset_name: str, *, in_flight: int, epochs: int) -> dict[str, Any]:
    """The job (one owner, the defaults but ``in_flight``, checkpoints on) through the loops in this process.

    Raises:
        RuntimeError: a party did not finish its job, or overran ``RUN_TIMEOUT_S``.
    """
    assemble.configure_process(THREADS, "cpu")  # as every party process sets itself up
    cfg = JobConfig(job_id="loop" + uuid.uuid4().hex[:8], model=model, data=dataset_name, epochs=epochs,
                    max_in_flight=in_flight)
    hub, stop = StubBroker(), threading.Event()
    stats = {"worker": Stats(), "trainer": Stats()}
    with tempfile.TemporaryDirectory(prefix="splitmq-loopcost-") as tmp:
        built = {"trainer": (cfg.stages[0], server.build(cfg, server.ServerOptions(
                     checkpoint_dir=str(Path(tmp) / "top")), stats["trainer"])),
                 "worker": (topology.client_name(0), worker.build(cfg, worker.WorkerOptions(
                     client_index=0, checkpoint_dir=str(Path(tmp) / "owner"), evaluate=False), stats["worker"]))}
        threads = {p: _Thread(Party(roles, hub.connect(name, topology.lease_queue(cfg.job_id, name)), loop,
                                    stats=stats[p], stop=stop.is_set))
                   for p, (name, (roles, loop)) in built.items()}
        for t in threads.values():
            t.thread.start()
        try:
            snapshots = _sample(threads, stats["worker"])
        finally:
            stop.set()  # the loops end at their next turn (at once, unless we overran)
            for t in threads.values():
                t.thread.join(30)
    for name, t in threads.items():
        if t.thread.is_alive():
            raise RuntimeError(f"the {name}'s loop did not stop within 30 s of being asked to")
        if t.error is not None or t.outcome is None or not t.outcome.summary.get("batches_applied"):
            raise RuntimeError(f"the {name}'s loop did not finish the job: {t.error or t.outcome}")
    total = float(stats["worker"].counts["samples"])
    cpu = window(snapshots, total)
    per_party = cast("dict[str, dict[str, float]]", cpu["us_per_sample"]) if cpu else None
    return {"in_flight": in_flight, "epochs": epochs, "samples": total,
            "us_per_sample": {p: v["total"] for p, v in per_party.items()} if per_party else None,
            "threads": {p: t.thread.name for p, t in threads.items()}}  # which loop ran where (bench.loopphases)


def _sample(threads: dict[str, _Thread], owner: Stats) -> list[Snapshot]:
    """Both threads' CPU with the owner's samples every ``PERIOD_S`` until both loops end."""
    snapshots: list[Snapshot] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while any(t.thread.is_alive() for t in threads.values()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the loops overran {RUN_TIMEOUT_S:.0f}s")
        try:
            cpu = {p: {"total": t.cpu()} for p, t in threads.items()}
        except OSError:  # a thread ended between the check and the read
            break
        snapshots.append(Snapshot(time.monotonic(), float(owner.counts["samples"]), cpu))
        time.sleep(PERIOD_S)
    return snapshots


def least_trainer(model: str, dataset_name: str, *, in_flight: int, epochs: int) -> dict[str, Any]:
    """µs per sample of the trainer's work at its least (module docstring), the calling thread's CPU
    over ``epochs`` passes of the job's bundles (one unmeasured pass first)."""
    assemble.configure_process(THREADS, "cpu")
    cfg = JobConfig(job_id="least" + uuid.uuid4().hex[:8], model=model, data=dataset_name, max_in_flight=in_flight)
    train = dataset(dataset_name).train
    bottom = assemble.bottom_stage(cfg, 0, len(train), "cpu")
    top = assemble.server_stage(cfg, 1, last=True, total_steps=lambda: 10**9, device="cpu")
    client, bodies, parts = topology.client_name(0), [], []
    for seq in range(len(train) // BATCH_SIZE):  # the worker's messages: real activations, coalesced as it sends
        batch = train.batch(torch.arange(seq * BATCH_SIZE, (seq + 1) * BATCH_SIZE))
        assert batch.x is not None
        fwd = wire.Forward(job_id=cfg.job_id, client_id=client, seq=seq, activations=bottom.infer(batch.x),
                           labels=batch.y, sample_ids=batch.ids)
        parts.append((topology.batch_id(client, seq), fwd.encode()))
        if len(parts) == cfg.coalesce:
            bodies.append(wire.Bundle(job_id=cfg.job_id, client_id=client, seq=seq, parts=tuple(parts)).encode())
            parts = []
    one = train.batch(torch.arange(1)).x
    assert one is not None
    limits = validate.Limits(cfg.job_id, tuple(bottom.infer(one).shape[1:]), cfg.batch_size)

    def one_pass() -> int:
        """Every bundle through the trainer's work; the samples trained."""
        samples = 0
        for body in bodies:
            bundle = wire.decode(body)
            assert isinstance(bundle, wire.Bundle)
            answers = []
            for cid, part in bundle.parts:
                msg = wire.decode(part)
                assert isinstance(msg, wire.Forward) and msg.labels is not None
                validate.check_forward(msg, limits)
                step = top.loss_step(msg.activations, msg.labels)
                answers.append((cid, wire.Backward(job_id=cfg.job_id, client_id=msg.client_id, seq=msg.seq,
                                                   model_version=top.version, grad=step.grad_input,
                                                   loss=step.loss).encode()))
                samples += len(msg.labels)
            wire.Bundle(job_id=cfg.job_id, client_id=client, seq=bundle.seq, parts=tuple(answers)).encode()
        return samples

    one_pass()  # unmeasured: caches, allocator, the optimizer's first steps
    start = time.thread_time()
    samples = sum(one_pass() for _ in range(epochs))
    cpu = time.thread_time() - start
    return {"in_flight": in_flight, "coalesce": cfg.coalesce, "epochs": epochs, "samples": samples,
            "us_per_sample": cpu / samples * 1e6 if samples else None}
