"""Run one splitmq job the way a user would: ``splitmq server`` + N ``splitmq worker`` processes.

Each job gets a fresh job id (its own queues, deleted afterwards), its own checkpoint and
summary files, and optionally a delaying proxy between the workers and the broker (the
trainer always talks to the broker directly). The workers exit when their epochs are done;
then the trainer's metrics are scraped and it is stopped with SIGTERM, which makes it write
its summary. Nothing here measures time itself except the workers' wall span, used for the
aggregate rate across clients.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pika

from splitmq.bench.common import AMQP_URL, DATASET, free_port, thread_env
from splitmq.bench.proxy import DelayProxy, proxied_url, upstream_of
from splitmq.shared import topology

#: A job that has not finished in this long is a failure, not a slow result.
JOB_TIMEOUT_S = 300.0
#: How long a worker waits for the trainer's answer to its hello (it is already consuming).
JOIN_TIMEOUT_S = 60
#: How long a starting trainer may take to consume its queue (imports torch, loads data).
READY_TIMEOUT_S = 120.0
#: How long the trainer may take to checkpoint and write its summary after SIGTERM.
STOP_GRACE_S = 4.0


@dataclass(frozen=True)
class JobSpec:
    """What one benchmark job runs: model, clients, window K, epochs, added one-way latency."""

    model: str
    clients: int
    in_flight: int
    epochs: int
    delay_s: float = 0.0
    checkpoints: bool = True
    dataset: str = DATASET
    #: More job flags for every party (e.g. ``("--compress-activations", "int8")``).
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.clients < 1 or self.in_flight < 1 or self.epochs < 1 or self.delay_s < 0:
            raise ValueError(f"invalid job spec {self}")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitmq", "--log-level", "WARNING", *args]


def _common(spec: JobSpec, job: str, url: str) -> list[str]:
    return ["--amqp-url", url, "--job-id", job, "--num-clients", str(spec.clients), "--epochs", str(spec.epochs),
            "--model", spec.model, "--max-in-flight", str(spec.in_flight), "--data", spec.dataset, *spec.options]


def _wait_for_consumer(url: str, queue: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Poll until the trainer consumes its forward queue (or it died, or time ran out)."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"splitmq server exited with {proc.returncode} before it was ready")
        with contextlib.suppress(pika.exceptions.AMQPError):
            conn = pika.BlockingConnection(pika.URLParameters(url))
            try:
                if conn.channel().queue_declare(queue, passive=True).method.consumer_count > 0:
                    return
            finally:
                if conn.is_open:
                    conn.close()
        time.sleep(0.2)  # polling an external process's readiness, with a deadline
    raise RuntimeError(f"splitmq server not consuming {queue} in time")


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _scrape(port: int) -> dict[str, float]:
    """The trainer's Prometheus samples, name{labels} -> value (the ``job_id`` label left out:
    one job per scrape)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            key = re.sub(r'job_id="[^"]*",?', "", key).replace("{}", "")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def _vm_hwm(pid: int) -> int:
    """Peak resident memory of a live process, in bytes, from /proc."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the trainer checkpoints and writes its summary); a second one if it lingers."""
    for signum, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        if server.poll() is not None:
            return
        server.send_signal(signum)
        try:
            server.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue


def _cleanup(url: str, job: str, clients: int, serving: tuple[str, ...] = (topology.TOP_STAGE,)) -> None:
    """Delete the job's queues and exchanges, the ``serving`` parties' inference queues included
    (the trainer declares its own): left behind, every run adds quorum queues to the node, and a
    node's open-file budget runs out at a few hundred (docs/scaling.md)."""
    layout = topology.job_layout(job, parties=tuple(f"client-{i}" for i in range(clients)), serving=serving)
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for q in layout.queues:
            conn.channel().queue_delete(q.name)
        for ex in layout.exchanges:
            conn.channel().exchange_delete(ex.name)
    finally:
        conn.close()


@contextlib.contextmanager
def _worker_url(url: str, delay_s: float) -> Iterator[str]:
    if delay_s <= 0:
        yield url
        return
    host, port = upstream_of(url)
    with DelayProxy(upstream_host=host, upstream_port=port, delay_s=delay_s) as proxy:
        yield proxied_url(url, proxy.port)


#: Called on a thread of its own once the workers have started: (trainer pid, worker pids, client-0's
#: metrics port); it returns when it is done watching (the workers' exit ends nothing by itself).
Watch = Callable[[int, list[int], int], None]


def run_job(spec: JobSpec, workdir: Path, *, url: str = AMQP_URL,
            worker_prefix: tuple[str, ...] = (), server_prefix: tuple[str, ...] = (),
            watch: Watch | None = None) -> dict[str, Any]:
    """Run one job to completion; the workers' and trainer's summaries plus scraped metrics.

    ``worker_prefix`` goes before client-0's interpreter arguments (e.g. cProfile), ``server_prefix``
    before the trainer's. ``watch``
    (if given) runs beside the workers, and client-0 then serves ``/metrics``.

    Raises:
        RuntimeError: a process failed or the job overran ``JOB_TIMEOUT_S``.
    """
    job = "bench" + uuid.uuid4().hex[:10]
    d = workdir / job
    d.mkdir(parents=True)
    env = thread_env()
    mport = free_port()
    cmd = _cli("server", *_common(spec, job, url), "--metrics-port", str(mport), "--serve-forever",
               "--summary-json", str(d / "server.json"), "--run-dir", str(d / "runs"),
               *(["--checkpoint-dir", str(d / "ckpt-server")] if spec.checkpoints else []))
    server = subprocess.Popen([cmd[0], *server_prefix, *cmd[1:]], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(d / "server.log", "wb"))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        try:
            _wait_for_consumer(url, topology.forward_queue(job), server, time.monotonic() + READY_TIMEOUT_S)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; server log: {_tail(d / 'server.log')}") from exc
        with _worker_url(url, spec.delay_s) as wurl:
            workers = _run_workers(spec, job, wurl, d, env, deadline, worker_prefix,
                                   (lambda pids, port: watch(server.pid, pids, port)) if watch else None)
        metrics = _scrape(mport)
        peak = _vm_hwm(server.pid)
    finally:
        _stop(server)
        _cleanup(url, job, spec.clients)
    summary = d / "server.json"
    trainer = json.loads(summary.read_text()) if summary.exists() else {}
    trainer = {k: v for k, v in trainer.items() if not isinstance(v, list)}  # e.g. every batch's loss
    return {"spec": asdict(spec), "job_id": job, "workers": workers, "trainer": trainer,
            "trainer_vm_hwm_bytes": peak, "trainer_metrics": _trainer_metrics(metrics), "run_dir": str(d / "runs")}


def _run_workers(spec: JobSpec, job: str, url: str, d: Path, env: dict[str, str], deadline: float,
                 prefix: tuple[str, ...], watch: Callable[[list[int], int], None] | None) -> list[dict[str, Any]]:
    procs = []
    port = free_port()
    for i in range(spec.clients):
        cid = topology.client_name(i)
        cmd = _cli("worker", *_common(spec, job, url), "--client-index", str(i), "--no-eval",
                   "--join-timeout", str(JOIN_TIMEOUT_S),
                   "--summary-json", str(d / f"{cid}.json"), "--run-dir", str(d / "runs"),
                   *(["--checkpoint-dir", str(d / f"ckpt-{cid}")] if spec.checkpoints else []),
                   *(["--metrics-port", str(port), "--metrics-linger", "0"] if i == 0 and watch else []))
        if i == 0 and prefix:
            cmd = [cmd[0], *prefix, *cmd[1:]]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(d / f"{cid}.log", "wb")))
    watcher = threading.Thread(target=watch, args=([p.pid for p in procs], port), daemon=True) if watch else None
    if watcher is not None:
        watcher.start()
    ended: dict[int, float] = {}
    try:
        while len(ended) < len(procs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job} overran {JOB_TIMEOUT_S:.0f}s")
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.time()
                    if p.returncode != 0:
                        log = _tail(d / f"client-{i}.log")
                        raise RuntimeError(f"worker client-{i} exited with {p.returncode}: {log}")
            time.sleep(0.05)  # polling child processes' exit, with a deadline
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)
        if watcher is not None:
            watcher.join(10)
    out = []
    for i in range(spec.clients):
        summary = json.loads((d / f"client-{i}.json").read_text())
        out.append({**summary, "exited_at": ended[i]})
    return out


def _trainer_metrics(samples: dict[str, float]) -> dict[str, float]:
    def get(name: str) -> float:
        return samples.get(name, float("nan"))

    return {
        "step_seconds_sum": get('splitmq_step_seconds_sum{role="trainer"}'),
        "step_seconds_count": get('splitmq_step_seconds_count{role="trainer"}'),
        "bytes_sent": get('splitmq_bytes_total{direction="sent",role="trainer"}'),
        "bytes_received": get('splitmq_bytes_total{direction="received",role="trainer"}'),
        "samples": get('splitmq_samples_total{role="trainer"}'),
    }


def aggregate(result: dict[str, Any]) -> dict[str, Any]:
    """One row: aggregate samples/s over the workers' joint span, latency, trainer step and memory.

    A worker's training span ends at its exit and lasts its summary's ``seconds``; the joint
    span runs from the earliest start to the latest end (teardown included: conservative).
    """
    ws = result["workers"]
    start = min(w["exited_at"] - w["seconds"] for w in ws)
    span = max(w["exited_at"] for w in ws) - start
    samples = sum(w["samples"] for w in ws)
    tm = result["trainer_metrics"]
    trainer = result["trainer"]
    sent = sum(w["bytes_sent"] for w in ws)
    received = sum(w["bytes_received"] for w in ws)
    return {
        **result["spec"], "samples": samples, "span_s": span, "samples_per_second": samples / span,
        "per_client_samples_per_second": [w["samples_per_second"] for w in ws],
        "round_trip_p50_s": sorted(w["round_trip_p50_s"] for w in ws)[len(ws) // 2],
        "round_trip_p99_s": max(w["round_trip_p99_s"] for w in ws),
        "trainer_step_mean_s": tm["step_seconds_sum"] / tm["step_seconds_count"] if tm["step_seconds_count"] else
        float("nan"),
        "trainer_step_p50_s": trainer.get("step_p50_s"), "trainer_step_p99_s": trainer.get("step_p99_s"),
        "trainer_peak_rss_bytes": trainer.get("peak_rss_bytes") or result["trainer_vm_hwm_bytes"],
        "worker_bytes_per_sample": (sent + received) / samples if samples else float("nan"),
        "worker_bytes_sent": sent, "worker_bytes_received": received,
        "worker_messages": sum(w.get("messages_sent", 0) + w.get("messages_received", 0) for w in ws),
        "trainer_bytes_sent": tm["bytes_sent"], "trainer_bytes_received": tm["bytes_received"],
        "completed": all(w.get("completed", True) for w in ws),
    }


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
