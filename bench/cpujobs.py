"""splitmq jobs measured in CPU per sample: trainer, worker and broker, over the steady state.

Each job runs as real processes (``bench.jobs``); while it runs, a ``cputime.Sampler`` reads
the CPU of the worker, the trainer and the broker node's ``beam.smp`` together with the
worker's ``splitmq_samples_total`` (its ``/metrics``, four times a second). The window is
20%-80% of the samples the run applies. After the run the trained segments (kept in the run
directory) are scored on the owner's test split: the accuracy of each setting. ``figures``,
``us`` and ``party_cells`` are what the parts built on it (``bench.compression``,
``bench.coalesce``) keep of a row and show of it, so their tables read alike.
"""
from __future__ import annotations

import contextlib
import urllib.request
from pathlib import Path
from typing import Any, Callable

import torch

from splitmq.bench import cputime, jobs, node
from splitmq.bench.common import dataset
from splitmq.shared import checkpoint, codec
from splitmq.shared.config import BottomSync, Compression, JobConfig
from splitmq.workers import assemble


def _samples(port: int) -> float | None:
    """client-0's applied samples, from its /metrics (None while it does not answer yet)."""
    with contextlib.suppress(OSError, ValueError):
        # only this family: rendering all of them four times a second cost the worker ~0.5 µs/sample
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics?name[]=splitmq_samples_total",
                                      timeout=2).read().decode()
        for line in text.splitlines():
            if line.startswith("splitmq_samples_total{") and 'role="worker"' in line:
                return float(line.rpartition(" ")[2])
    return None


#: The unmeasured job a freshly started benchmark node runs first (``node.own_node``).
WARM_UP = jobs.JobSpec(model="mlp", clients=1, in_flight=4, epochs=2)


def warm_up(workdir: Path) -> Callable[[node.Node], object]:
    """``node.own_node``'s warm-up: one job like the ones measured, its figures thrown away."""
    return lambda n: jobs.run_job(WARM_UP, workdir / "warm-up", url=n.url)


def run(spec: jobs.JobSpec, workdir: Path, *, url: str, broker_pid: int | None) -> dict[str, Any]:
    """One job with its CPU per sample (µs, by party and thread group), wall clock and accuracy."""
    samplers: list[cputime.Sampler] = []

    def watch(trainer: int, workers: list[int], port: int) -> None:
        pids = {"worker": workers[0], "trainer": trainer, **({"broker": broker_pid} if broker_pid else {})}
        sampler = cputime.Sampler(pids, lambda: _samples(port))
        samplers.append(sampler)
        sampler.start()
        while jobs.pid_alive(workers[0]) and not sampler._stop.is_set():
            sampler._stop.wait(0.5)
        sampler.stop()

    result = jobs.run_job(spec, workdir, url=url, watch=watch)
    row = jobs.aggregate(result)
    total = len(dataset(spec.dataset).train) * spec.epochs / spec.clients
    row["cpu"] = cputime.window(samplers[0].snapshots, total) if samplers else None
    row["accuracy"] = accuracy(spec, Path(result["run_dir"]))
    row["codec_bytes_per_sample"] = row["worker_bytes_per_sample"]
    return row


def figures(row: dict[str, Any]) -> dict[str, Any]:
    """What a part's table reads of one ``run`` row: bytes, accuracy, rate and CPU per sample by party."""
    cpu = row.get("cpu") or {}
    return {"bytes_per_sample": row["worker_bytes_per_sample"], "accuracy": row["accuracy"],
            "samples_per_second": row["samples_per_second"], "cpu_us_per_sample": cpu.get("total_us_per_sample"),
            "cpu_by_party": cpu.get("us_per_sample", {}), "wal_rollovers": row.get("wal_rollovers"),
            "settled_s": row.get("settled_s")}


def us(parties: dict[str, dict[str, float]], party: str, group: str = "total") -> str:
    """µs per sample of ``party`` (thread ``group``) as a table cell; "n/a" where it was not measured."""
    value = parties.get(party, {}).get(group)
    return f"{value:.0f}" if value is not None else "n/a"


def party_cells(parties: dict[str, dict[str, float]]) -> str:
    """The cells ``worker µs (main / pika) | trainer µs (main / pika) | broker µs`` of a table row."""
    split = [f"{us(parties, p)} ({us(parties, p, 'main')} / {us(parties, p, 'pika')})" for p in ("worker", "trainer")]
    return " | ".join([*split, us(parties, "broker")])


def accuracy(spec: jobs.JobSpec, run_dir: Path) -> float | None:
    """Test accuracy of the trained bottom (client-0's) and top chained, on client-0's test split, the
    activations crossing the cut as the job sends them (its ``--compress-activations``, as when served)."""
    bottom, top = run_dir / "segments-client-0.pt", run_dir / "segments-top.pt"
    if not bottom.exists() or not top.exists():
        return None
    cfg = JobConfig(model=spec.model, num_clients=spec.clients, data=spec.dataset,
                    bottom_sync=BottomSync.INDEPENDENT)
    data = assemble.owner_data(cfg, 0)
    if data.test is None or not isinstance(data.test.x, torch.Tensor) or data.test.y is None:
        return None
    segs = [assemble.segment(cfg, 0), assemble.segment(cfg, 1)]
    for seg, path, index in ((segs[0], bottom, 0), (segs[1], top, 1)):
        saved = checkpoint.load(path)
        assert saved is not None
        seg.load_state_dict(saved["segments"][index]["state_dict"])
        seg.eval()
    cut = codec.codec_for(Compression(_option(spec, "--compress-activations", "none")),
                          topk_fraction=float(_option(spec, "--topk-fraction", str(JobConfig.topk_fraction))))
    with torch.no_grad():
        payload, extras = cut.encode(segs[0](data.test.x))      # what travels at evaluation (no feedback)
        out = segs[1](cut.decode(payload, extras, "activations"))  # (N, classes)
    return float((out.argmax(dim=1) == data.test.y).float().mean())


def _option(spec: jobs.JobSpec, flag: str, default: str) -> str:
    """The value given to ``flag`` in the job's extra options (``default`` if not given)."""
    options = list(spec.options)
    return options[options.index(flag) + 1] if flag in options[:-1] else default
