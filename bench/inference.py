"""``splitmq bench inference``: prediction latency and throughput through the broker, in one run.

For the MLP and the CNN, side by side and from the same run:

* **local forward**: the unsplit model's forward pass in this process (one sample, and
  batches of ``REQUEST_SIZE`` over the data set): the limit, no messages at all;
* **raw broker round trip**: a raw pika round trip (``bench.ceiling``, durable, one in flight)
  of exactly the bytes of one ``predict`` request and its ``prediction`` answer;
* **splitmq online**: one request at a time from a ``Predictor`` (the owner's bottom in this
  process) to ``splitmq server --serve-forever`` (its own process), p50 and p99;
* **splitmq batch**: the whole data set in requests of ``REQUEST_SIZE`` with ``IN_FLIGHT``
  outstanding, samples/s against local inference.

Weights are the models' initial ones (latency does not depend on training). The section it
writes into docs/benchmarks.md is kept when the main suite regenerates that page.
"""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from splitmq.bench import ceiling, sections
from splitmq.bench.common import AMQP_URL, MODELS, free_port, machine, percentile, set_threads, thread_env
from splitmq.bench.jobs import READY_TIMEOUT_S, _cleanup, _stop, _tail, _wait_for_consumer
from splitmq.shared import checkpoint, topology, wire
from splitmq.shared.config import BottomSync, JobConfig
from splitmq.workers import assemble, segments
from splitmq.workers.predict import PredictOptions, Predictor, predict_all

START, END = sections.markers("inference")
REQUEST_SIZE = 256
IN_FLIGHT = 4


def _timed(fn: Callable[[], Any], n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def _local(cfg: JobConfig, x: torch.Tensor, n: int) -> dict[str, Any]:
    """The unsplit model's forward: one sample (latency) and whole batches (throughput)."""
    from splitmq.workers.export import unsplit
    model = unsplit(cfg).eval()
    with torch.no_grad():
        one = _timed(lambda: model(x[:1]), n)
        started = time.perf_counter()
        for rows in torch.split(torch.arange(len(x)), REQUEST_SIZE):
            model(x[rows])
        seconds = time.perf_counter() - started
    return {"forward_p50_s": percentile(one, 0.5), "forward_p99_s": percentile(one, 0.99),
            "samples_per_second": len(x) / seconds}


def _raw(cfg: JobConfig, x: torch.Tensor, seconds: float) -> dict[str, Any]:
    """A raw durable round trip of the bytes of one online request and its answer."""
    from splitmq.workers.export import unsplit
    model = unsplit(cfg).eval()
    with torch.no_grad():
        cut = model.segments[0](x[:1])  # type: ignore[index,operator]
        out = model(x[:1])
    up = wire.Predict(job_id="bench", client_id="client-0", seq=1, inputs=cut, sample_ids=torch.arange(1),
                      request_id="client-0:predict:1-0", deadline=time.time()).encode()
    down = wire.Prediction(job_id="bench", client_id="client-0", seq=1, outputs=out,
                           request_id="client-0:predict:1-0").encode()
    return ceiling.round_trips(AMQP_URL, mode="durable", in_flight=1, request_bytes=len(up), reply_bytes=len(down),
                               seconds=seconds)


def _server(cfg: JobConfig, workdir: Path) -> subprocess.Popen[bytes]:
    log = workdir / f"server-{cfg.model}.log"
    argv = [sys.executable, "-m", "splitmq", "--log-level", "WARNING", "server", "--amqp-url", AMQP_URL,
            "--job-id", cfg.job_id, "--model", cfg.model, "--data", cfg.data, "--bottom-sync", "independent",
            "--serve-forever", "--run-dir", str(workdir / cfg.job_id), "--metrics-port", str(free_port())]
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=thread_env())
    try:
        _wait_for_consumer(AMQP_URL, topology.serve_queue(cfg.job_id, "top"), proc,
                           time.monotonic() + READY_TIMEOUT_S)
    except RuntimeError as exc:
        _stop(proc)
        raise RuntimeError(f"{exc}: {_tail(log)}") from None
    return proc


def _keep_owner(cfg: JobConfig, run_dir: Path) -> None:
    """The owner's segments file, as training would have left it (initial weights)."""
    bottom = assemble.segment(cfg, 0)
    checkpoint.save(segments.path_for(run_dir, "client-0"), {
        "config": cfg.agreed(), "party": "client-0", "exit": "done",
        "segments": {0: {"state_dict": bottom.state_dict(), "version": 0}}})


def _split(cfg: JobConfig, x: torch.Tensor, n: int, workdir: Path) -> dict[str, Any]:
    """Online latency and batch throughput through ``splitmq server --serve-forever``."""
    run_dir = workdir / cfg.job_id
    _keep_owner(cfg, run_dir)
    server = _server(cfg, workdir)
    try:
        with Predictor(cfg, PredictOptions(run_dir=str(run_dir)), amqp_url=AMQP_URL) as p:
            ids = torch.arange(len(x))
            online = _timed(lambda: p.predict(x[:1], ids[:1]), n, warmup=20)
            started = time.perf_counter()
            predict_all(p, x, ids, batch_size=REQUEST_SIZE, in_flight=IN_FLIGHT)
            seconds = time.perf_counter() - started
    finally:
        _stop(server)
        _cleanup(AMQP_URL, cfg.job_id, 1, serving=(topology.TOP_STAGE, "client-0"))
    return {"online_p50_s": percentile(online, 0.5), "online_p99_s": percentile(online, 0.99), "requests": n,
            "batch_samples_per_second": len(x) / seconds, "batch_samples": len(x)}


def run(quick: bool, workdir: Path, dataset: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every model's local, raw and splitmq numbers, and their ratios."""
    set_threads()
    n, seconds = (30, 0.3) if quick else (400, 3.0)
    out: dict[str, Any] = {"machine_at_start": machine(), "quick": quick, "dataset": dataset, "models": {}}
    for model in MODELS:
        cfg = JobConfig(job_id="bi" + uuid.uuid4().hex[:8], model=model, data=dataset,
                        bottom_sync=BottomSync.INDEPENDENT)
        samples = assemble.owner_data(cfg, 0)
        x = samples.train.x
        assert isinstance(x, torch.Tensor)
        log(f"bench inference: {model}: local, raw broker, splitmq...")
        row = {"local": _local(cfg, x, n), "raw": _raw(cfg, x, seconds), "splitmq": _split(cfg, x, n, workdir)}
        s, loc, raw = row["splitmq"], row["local"], row["raw"]
        row["ratios"] = {"online_p50_over_raw_p50": s["online_p50_s"] / raw["rtt_p50_s"],
                         "online_p50_over_local_p50": s["online_p50_s"] / loc["forward_p50_s"],
                         "batch_over_local": s["batch_samples_per_second"] / loc["samples_per_second"]}
        out["models"][model] = row
    out["machine"] = machine()
    return out


def markdown(r: dict[str, Any], command: str) -> str:
    """The section docs/benchmarks.md keeps between its markers."""
    m = r["machine"]
    lines = [START, "## Inference through the broker (`splitmq bench inference`)", "",
             sections.provenance(command, m, quick=r["quick"]) +
             f"Untrained weights (latency does not depend on them), {r['dataset']} data, one torch thread per "
             "process; splitmq: the owner's `Predictor` (bottom in-process) and `splitmq server --serve-forever` "
             "(top, its own process), durable quorum queues, persistent confirmed messages. Raw results: "
             "`docs/benchmarks-inference.json`.", "",
             "| model | local forward p50 / p99 ms (1 sample) | raw durable round trip p50 / p99 ms (same bytes) | "
             "splitmq online p50 / p99 ms | online p50 / raw p50 | online p50 / local p50 |",
             "|---|---:|---:|---:|---:|---:|"]
    for model, row in r["models"].items():
        loc, raw, s, q = row["local"], row["raw"], row["splitmq"], row["ratios"]
        lines.append(f"| {model} | {loc['forward_p50_s'] * 1e3:.3f} / {loc['forward_p99_s'] * 1e3:.3f} | "
                     f"{raw['rtt_p50_s'] * 1e3:.2f} / {raw['rtt_p99_s'] * 1e3:.2f} | "
                     f"{s['online_p50_s'] * 1e3:.2f} / {s['online_p99_s'] * 1e3:.2f} | "
                     f"{q['online_p50_over_raw_p50']:.2f} | {q['online_p50_over_local_p50']:.0f} |")
    lines += ["", f"| model | local inference samples/s (batches of {REQUEST_SIZE}) | splitmq batch samples/s "
              f"({REQUEST_SIZE} per request, {IN_FLIGHT} in flight) | splitmq / local |", "|---|---:|---:|---:|"]
    for model, row in r["models"].items():
        lines.append(f"| {model} | {row['local']['samples_per_second']:,.0f} | "
                     f"{row['splitmq']['batch_samples_per_second']:,.0f} | {row['ratios']['batch_over_local']:.2f} |")
    lines += ["", "Online requests carry one sample: the broker round trip, not the model, is the latency; batch "
              "prediction amortises it over 256 samples per request.", END]
    return "\n".join(lines) + "\n"


def write(r: dict[str, Any], command: str, out_md: Path, out_json: Path) -> None:
    """Replace (or append) the inference section of ``out_md``; raw results in ``out_json``."""
    sections.write("inference", markdown(r, command), r, out_md, out_json)
