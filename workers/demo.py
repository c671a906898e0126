"""``splitmq demo``: one trainer and N workers as separate processes on the local broker,
then the same model trained locally, side by side."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from splitmq.shared import broker, local, topology
from splitmq.shared.config import JobConfig
from splitmq.workers import runtime

#: Defaults chosen so the demo shows asynchronous training matching local accuracy.
DEMO_DEFAULTS = {"epochs": 30, "num_clients": 2, "max_in_flight": 4}


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "splitmq", *args], stdout=log, stderr=subprocess.STDOUT)


def _scrape(port: int) -> dict[str, float]:
    """A few sample values from a worker's /metrics (empty if it is not serving yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "splitmq_batches_total" and sample.labels.get("outcome") == "applied":
                out["applied"] = sample.value
            elif sample.name in ("splitmq_loss", "splitmq_test_accuracy_ratio"):
                out[sample.name] = sample.value
    return out


def _progress(ports: list[int], total: int, tty: bool, last: list[str]) -> None:
    bars = []
    for i, port in enumerate(ports):
        m = _scrape(port)
        done = int(m.get("applied", 0))
        frac = min(1.0, done / total) if total else 1.0
        bar = "#" * int(frac * 24)
        acc = m.get("splitmq_test_accuracy_ratio", 0.0)
        bars.append(f"client-{i} [{bar:<24}] {done:>5}/{total} loss {m.get('splitmq_loss', float('nan')):.3f}"
                    f" acc {acc:.3f}")
    text = " | ".join(bars)
    if tty:
        print("\r" + text, end="", flush=True)
    elif text != (last[0] if last else "") and int(time.time()) % 5 == 0:
        print(text, flush=True)
        last[:] = [text]


def run_demo(cfg: JobConfig, *, amqp_url: str, metrics_port_base: int, workdir: Path, show: bool) -> dict[str, Any]:
    """Run the split job in subprocesses, then the local baseline; returns the summary."""
    broker.delete_queues(amqp_url, [topology.forward_queue(cfg.job_id), topology.dead_letter_queue(cfg.job_id)]
                         + [topology.reply_queue(cfg.job_id, f"client-{i}") for i in range(cfg.num_clients)])
    common = ["--amqp-url", amqp_url, "--job-id", cfg.job_id, "--num-clients", str(cfg.num_clients),
              "--epochs", str(cfg.epochs), "--max-in-flight", str(cfg.max_in_flight), "--model", cfg.model,
              "--staleness", cfg.staleness, "--bottom-sync", cfg.bottom_sync, "--run-dir", str(workdir / "run")]
    server = _spawn(["server", *common, "--metrics-port", str(metrics_port_base),
                     "--summary-json", str(workdir / "server.json")], workdir / "server.log")
    ports = [metrics_port_base + 1 + i for i in range(cfg.num_clients)]
    workers = [_spawn(["worker", *common, "--client-id", f"client-{i}", "--client-index", str(i),
                       "--metrics-port", str(ports[i]), "--summary-json", str(workdir / f"client-{i}.json")],
                      workdir / f"client-{i}.log") for i in range(cfg.num_clients)]
    total = cfg.epochs * -(-len_train(cfg) // cfg.batch_size)
    tty, last = sys.stdout.isatty() and show, []
    try:
        while any(w.poll() is None for w in workers):
            if show:
                _progress(ports, total, tty, last)
            time.sleep(0.5)  # a progress display's refresh period, not a synchronisation
        if show:
            _progress(ports, total, tty, last)
            print()
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    failed = [i for i, w in enumerate(workers) if w.returncode != 0]
    if failed or server.returncode != 0:
        logs = "\n".join((workdir / f"client-{i}.log").read_text()[-2000:] for i in failed)
        raise RuntimeError(f"demo parties failed (workers {failed}, server rc {server.returncode}); see {workdir}\n{logs}")
    summaries = [json.loads((workdir / f"client-{i}.json").read_text()) for i in range(cfg.num_clients)]
    server_summary = json.loads((workdir / "server.json").read_text())
    torch.set_num_threads(1)
    baseline = local.train_local(cfg)
    split_acc = sum(s["test_accuracy"] for s in summaries) / len(summaries)
    seconds = max(s["seconds"] for s in summaries)
    return {
        "split_test_accuracy": split_acc, "local_test_accuracy": baseline.test_accuracy,
        "epochs": cfg.epochs, "clients": cfg.num_clients, "max_in_flight": cfg.max_in_flight,
        "model": cfg.model, "staleness": cfg.staleness, "bottom_sync": cfg.bottom_sync,
        "samples_per_second": sum(s["samples"] for s in summaries) / seconds if seconds else 0.0,
        "local_samples_per_second": baseline.samples_per_second,
        "round_trip_p50_s": sorted(s["round_trip_p50_s"] for s in summaries)[len(summaries) // 2],
        "trainer_batches": server_summary["batches_applied"],
        "metrics": {"trainer": f"http://localhost:{metrics_port_base}/metrics",
                    "workers": [f"http://localhost:{p}/metrics" for p in ports]},
        "logs": str(workdir),
    }


def len_train(cfg: JobConfig) -> int:
    from splitmq.shared import data
    return len(data.shard(data.load(cfg.dataset, cfg.data_dir, cfg.test_fraction).train, 0, cfg.num_clients).y)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="train the default model split across local processes, beside a local baseline")
    p.add_argument("--config")
    p.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", runtime.config.DEFAULT_AMQP_URL))
    p.add_argument("--job-id", default="demo")
    p.add_argument("--epochs", type=int, default=DEMO_DEFAULTS["epochs"])
    p.add_argument("--clients", type=int, default=DEMO_DEFAULTS["num_clients"])
    p.add_argument("--max-in-flight", type=int, default=DEMO_DEFAULTS["max_in_flight"])
    p.add_argument("--model", default=None, choices=["mlp", "cnn"])
    p.add_argument("--staleness", choices=list(runtime.config.STALENESS_MODES))
    p.add_argument("--bottom-sync", choices=list(runtime.config.BOTTOM_SYNC_MODES))
    p.add_argument("--metrics-port-base", type=int, default=9400)
    p.add_argument("--workdir", help="where logs and summaries go (default: a new temporary directory)")
    p.add_argument("--json", action="store_true", help="print only the summary, as one JSON object")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = runtime.config.load(args.config, {
        "job_id": args.job_id, "epochs": args.epochs, "num_clients": args.clients,
        "max_in_flight": args.max_in_flight, "model": args.model, "staleness": args.staleness,
        "bottom_sync": args.bottom_sync})
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="splitmq-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.json:
        print(f"splitmq demo: {cfg.num_clients} workers + 1 trainer over {runtime.redact(args.amqp_url)}, "
              f"model {cfg.model}, {cfg.epochs} epochs, {cfg.max_in_flight} batch(es) in flight per worker")
    summary = run_demo(cfg, amqp_url=args.amqp_url, metrics_port_base=args.metrics_port_base, workdir=workdir,
                       show=not args.json)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"\n  split learning test accuracy : {summary['split_test_accuracy']:.4f}")
    print(f"  local (unsplit) accuracy    : {summary['local_test_accuracy']:.4f}")
    print(f"  split throughput            : {summary['samples_per_second']:.0f} samples/s "
          f"(local: {summary['local_samples_per_second']:.0f} samples/s)")
    print(f"  metrics: trainer {summary['metrics']['trainer']}, workers {', '.join(summary['metrics']['workers'])}"
          " (served while the parties run)")
    print(f"  logs, summaries and history: {workdir}  (splitmq plot --run-dir {workdir}/run)")
    return 0
