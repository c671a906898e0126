"""Helpers for tests that run real parties against the real broker (processes or threads)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from splitmq.shared import checkpoint, topology
from splitmq.shared.broker import Broker
from splitmq.shared.config import JobConfig
from splitmq.shared.metrics import Metrics
from splitmq.workers import server, worker
from splitmq.workers.demo import write_job
from splitmq.workers.exits import ExitReason
from splitmq.workers.stats import Stats
from tests.stubs import Running

ROOT = Path(__file__).resolve().parents[1]
#: Longest wait for any one event (a process start, a run finishing) on a busy 2-core machine.
DEADLINE_S = 300.0


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def consumers(url: str, queue: str) -> int:
    """How many consumers ``queue`` has (0 if it does not exist yet)."""
    import pika
    import pika.exceptions
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if conn.is_open:
            conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job_file(cfg: JobConfig, tmp: Path, name: str = "job.toml") -> Path:
    """The job as the TOML every party loads with --config."""
    path = tmp / name
    write_job(cfg, path)
    lines = path.read_text().splitlines()
    extra = {"checkpoint_every": cfg.checkpoint_every, "dc_lambda": cfg.dc_lambda, "test_fraction": cfg.test_fraction}
    path.write_text("\n".join(lines + [f"{k} = {json.dumps(v)}" for k, v in extra.items()]) + "\n")
    return path


class Party:
    """One ``splitmq`` process; restartable with the same arguments, logging to one file."""

    def __init__(self, tmp: Path, name: str, command: str, args: list[str], *, metrics: bool = True) -> None:
        self.name, self.command, self.args, self.metrics = name, command, args, metrics
        self.log = tmp / f"{name}.log"
        self.summary_path = tmp / f"{name}-summary.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    def start(self) -> "Party":
        self.port = free_port()
        argv = [sys.executable, "-m", "splitmq", self.command, *self.args, "--summary-json", str(self.summary_path)]
        if self.metrics:
            argv += ["--metrics-port", str(self.port)]
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
        if self.alive:
            self.signal(signal.SIGKILL)
            self.wait()

    def stop(self) -> int:
        """SIGTERM: finish the current message, checkpoint, write the summary, exit."""
        if self.alive:
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

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def close(self) -> None:
        if self.alive:
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait()  # type: ignore[union-attr]


def server_party(tmp: Path, job: Path, url: str, *extra: str, name: str = "trainer",
                 ckpt: bool = True) -> Party:
    args = ["--config", str(job), "--amqp-url", url, "--run-dir", str(tmp / "run"), *extra]
    if ckpt:
        args += ["--checkpoint-dir", str(tmp / f"ckpt-{name}")]
    return Party(tmp, name, "server", args)


def worker_party(tmp: Path, job: Path, url: str, index: int = 0, *extra: str, ckpt: bool = True) -> Party:
    name = topology.client_name(index)
    args = ["--config", str(job), "--amqp-url", url, "--run-dir", str(tmp / "run"), "--client-index", str(index),
            *extra]
    if ckpt:
        args += ["--checkpoint-dir", str(tmp / f"ckpt-{name}")]
    return Party(tmp, name, "worker", args)


def state(tmp: Path, party: str, role: str) -> dict[str, Any]:
    """A role's part of the checkpoint in ``<tmp>/ckpt-<party>`` (``{"role": ..., "ledger": ...}``)."""
    files = sorted((tmp / f"ckpt-{party}").glob("*.pt"))
    assert len(files) == 1, f"{party} left {len(files)} checkpoints"
    saved = checkpoint.load(files[0])
    assert saved is not None
    return dict(saved["roles"][role])


def in_thread(kind: str, cfg: JobConfig, url: str, **opts: Any) -> Running:
    """A server or worker party in a thread of the test process, on the real broker."""
    stats = Stats(Metrics("trainer" if kind == "server" else "worker", CollectorRegistry(), job_id=cfg.job_id))
    if kind == "server":
        roles, loop = server.build(cfg, server.ServerOptions(**opts), stats)
    else:
        roles, loop = worker.build(cfg, worker.WorkerOptions(**opts), stats)
    transport = Broker(url, name=loop.name, lease=topology.lease_queue(cfg.job_id, loop.name),
                       prefetch=256)
    return Running(roles, transport, loop, stats).start()  # type: ignore[arg-type]


def train_in_threads(cfg: JobConfig, url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One owner and one trainer in threads on the real broker, to the end; their summaries (owner, trainer)."""
    top = in_thread("server", cfg, url)
    owner = in_thread("worker", cfg, url)
    owner_end, top_end = owner.wait(), top.wait()
    assert owner_end.reason is ExitReason.DONE and top_end.reason is ExitReason.DONE, (owner_end, top_end.detail)
    return owner_end.summary, top_end.summary


def assert_segments_equal(states: list[dict[str, torch.Tensor]], reference: list[torch.nn.Module]) -> None:
    """Each party's final segment equals the same segment of the local baseline, bit for bit."""
    assert len(states) == len(reference)
    for got, want in zip(states, reference):
        want_state = want.state_dict()
        assert set(got) == set(want_state)
        for name, value in got.items():
            torch.testing.assert_close(value, want_state[name], atol=0, rtol=0)


def spy_queue(amqp_url: str, job: str, routing_keys: list[str]) -> str:
    """A queue that receives a copy of every activation of ``job`` and of its replies to
    ``routing_keys`` (the privacy tests read what crossed the broker from it)."""
    import pika

    from splitmq.shared import topology
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    name = f"splitmq.{job}.spy"
    ch.exchange_declare(topology.activations_exchange(job), "topic", durable=True)
    ch.exchange_declare(topology.gradients_exchange(job), "direct", durable=True)
    ch.queue_declare(name, durable=True)
    ch.queue_bind(name, topology.activations_exchange(job), "#")
    for key in routing_keys:
        ch.queue_bind(name, topology.gradients_exchange(job), key)
    conn.close()
    return name
