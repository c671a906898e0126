"""``splitmq demo``: one trainer and N data owners as separate processes on the local broker,
then the same model trained locally, side by side.

The demo writes the job to ``<workdir>/job.toml`` and starts every party with
``--config`` on it, exactly as a user would run them by hand; each party exits by itself
when the job is done.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from splitmq.shared import config, topology

#: Defaults chosen so the demo shows asynchronous training matching local accuracy.
DEMO_DEFAULTS = {"epochs": 30, "num_clients": 2, "max_in_flight": 4}


def _scrape(port: int) -> dict[str, float]:
    """A few sample values from a worker's /metrics (empty if it is not serving)."""
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


def _bar(name: str, done: int, total: int, loss: float | None, acc: float | None) -> str:
    frac = min(1.0, done / total) if total else 1.0
    loss_text = "n/a" if loss is None else f"{loss:.3f}"
    acc_text = "n/a" if acc is None else f"{acc:.3f}"
    return f"{name} [{'#' * int(frac * 24):<24}] {done:>5}/{total} loss {loss_text} acc {acc_text}"


def write_job(cfg: config.JobConfig, path: Path) -> None:
    """The job as a TOML file every party loads with --config."""
    lines = ["[job]"]
    for name, value in cfg.agreed().items():
        lines.append(f"{name} = {json.dumps(value)}")
    for name in ("data", "max_in_flight", "staleness"):
        lines.append(f"{name} = {json.dumps(config._plain(getattr(cfg, name)))}")
    path.write_text("\n".join(lines) + "\n")


def run_demo(cfg: config.JobConfig, *, amqp_url: str, metrics_port_base: int, workdir: Path,
             show: bool) -> dict[str, Any]:
    """Run the split job in subprocesses, then the local baseline; returns the summary."""
    from splitmq.shared import amqp, data, local
    from splitmq.workers.launch import PartySpec, run_parties

    amqp.delete_queues(amqp_url, [topology.forward_queue(cfg.job_id), topology.dead_letter_queue(cfg.job_id)]
                         + [topology.reply_queue(cfg.job_id, topology.client_name(i)) for i in range(cfg.num_clients)])
    job = workdir / "job.toml"
    write_job(cfg, job)
    ports = [metrics_port_base + 1 + i for i in range(cfg.num_clients)]
    names = [topology.client_name(i) for i in range(cfg.num_clients)]
    parties = [PartySpec("server", "server", ("--metrics-port", str(metrics_port_base)))]
    parties += [PartySpec(n, "worker", ("--client-index", str(i), "--metrics-port", str(ports[i])))
                for i, n in enumerate(names)]
    samples = data.load(cfg.data, data_dir=cfg.data_dir, test_fraction=cfg.test_fraction, num_clients=cfg.num_clients)
    total = cfg.epochs * data.batches_per_epoch(len(samples.train), cfg.batch_size)
    tty = sys.stdout.isatty() and show
    last = [""]

    def progress() -> None:
        line = " | ".join(_bar(n, int(m.get("applied", 0)), total, m.get("splitmq_loss"),
                               m.get("splitmq_test_accuracy_ratio")) for n, m in zip(names, map(_scrape, ports)))
        if tty:
            print("\r" + line, end="", flush=True)
        elif line != last[0] and int(time.monotonic()) % 10 == 0:
            print(line, flush=True)
            last[0] = line

    run = run_parties(job, parties, amqp_url=amqp_url, workdir=workdir, progress=progress if show else None)
    summaries = [run.summaries[n] for n in names]
    if show:
        final = " | ".join(_bar(n, s["batches"], total, (s["losses"] or [None])[-1], s["test_scores"].get("accuracy"))
                           for n, s in zip(names, summaries))
        print(("\r" if tty else "") + final)
    baseline = local.train_local(cfg.replace(num_clients=1))
    seconds = max(s["seconds"] for s in summaries)
    return {
        "split_test_accuracy": sum(s["test_scores"].get("accuracy", 0.0) for s in summaries) / len(summaries),
        "local_test_accuracy": baseline.test_accuracy,
        "epochs": cfg.epochs, "clients": cfg.num_clients, "max_in_flight": cfg.max_in_flight,
        "model": cfg.model, "staleness": cfg.staleness.value, "bottom_sync": cfg.bottom_sync.value,
        "samples_per_second": sum(s["samples"] for s in summaries) / seconds if seconds else 0.0,
        "local_samples_per_second": baseline.samples_per_second,
        "round_trip_p50_s": sorted(s["round_trip_p50_s"] for s in summaries)[len(summaries) // 2],
        "trainer_batches": run.summaries["server"]["batches_applied"],
        "trainer_exit": run.summaries["server"]["exit"],
        "logs": str(workdir),
    }


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="train the default model split across local processes, beside a local baseline",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="a job TOML to start from (docs/api.md)")
    p.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", config.DEFAULT_AMQP_URL), help="broker URL")
    p.add_argument("--job-id", default="demo", help="job name (its queues are reset first)")
    p.add_argument("--epochs", type=int, default=DEMO_DEFAULTS["epochs"], help="epochs")
    p.add_argument("--num-clients", type=int, default=DEMO_DEFAULTS["num_clients"], help="data owners")
    p.add_argument("--max-in-flight", type=int, default=DEMO_DEFAULTS["max_in_flight"], help="batches in flight each")
    p.add_argument("--model", default=None, help="mlp, cnn, or package.module:function")
    p.add_argument("--staleness", choices=[s.value for s in config.Staleness], help="stale-gradient correction")
    p.add_argument("--bottom-sync", choices=[s.value for s in config.BottomSync], help="how owners' bottoms relate")
    p.add_argument("--metrics-port-base", type=int, default=9400, help="trainer's /metrics port; workers' follow")
    p.add_argument("--workdir", help="where logs and summaries go (default: a new temporary directory)")
    p.add_argument("--json", action="store_true", help="print only the summary, as one JSON object")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, {
        "job_id": args.job_id, "epochs": args.epochs, "num_clients": args.num_clients,
        "max_in_flight": args.max_in_flight, "model": args.model, "staleness": args.staleness,
        "bottom_sync": args.bottom_sync})
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="splitmq-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not args.json:
        print(f"splitmq demo: {cfg.num_clients} data owner(s) + 1 trainer over the broker, model {cfg.model}, "
              f"{cfg.epochs} epochs, {cfg.max_in_flight} batch(es) in flight per owner (job: {workdir}/job.toml)")
    summary = run_demo(cfg, amqp_url=args.amqp_url, metrics_port_base=args.metrics_port_base, workdir=workdir,
                       show=not args.json)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"\n  split learning test accuracy : {summary['split_test_accuracy']:.4f}")
    print(f"  local (unsplit) accuracy    : {summary['local_test_accuracy']:.4f}")
    print(f"  split throughput            : {summary['samples_per_second']:.0f} samples/s "
          f"(local: {summary['local_samples_per_second']:.0f} samples/s)")
    print(f"  logs, summaries and history: {workdir}  (splitmq plot --run-dir {workdir}/run)")
    return 0
