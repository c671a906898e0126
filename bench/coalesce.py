"""Coalescing measured: messages, bytes and CPU per sample with ``coalesce`` 1 and 4 at K=4.

Run: ``splitmq bench coalesce [--quick]`` (``python -m splitmq.bench.coalesce`` runs the same). One run trains
the same job (MLP, one owner, K=4, checkpoints on) once per setting as real ``splitmq server`` +
``splitmq worker`` processes on a RabbitMQ node of the benchmark's own (``bench.node``, so the
broker's ``beam.smp`` CPU is this run's alone), measured like ``splitmq bench compression``
(``bench.cpujobs``: CPU per process from ``/proc`` over the 20%-80% window). Messages per sample
are the worker's messages sent and received (every message between it and the trainer) per
training sample. Ratios are against the ``coalesce = 1`` row of the same run. Its section of
docs/benchmarks.md sits between markers and is kept when the main suite regenerates the page;
its raw results go to docs/benchmarks-coalesce.json. ``--quick`` (a smoke test of seconds) runs
each setting once for one epoch of synthetic data on the shared broker (no broker CPU: it is not
ours alone); its numbers mean nothing.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable

from splitmq.bench import cpujobs, jobs, node, sections
from splitmq.bench.common import AMQP_URL, DATASET, machine, median, ratio

START, END = sections.markers("coalesce")
#: The settings measured, ``coalesce = 1`` first (the reference of every ratio).
SETTINGS = (1, 4)
#: Pairs of runs (each setting once, alternating) a full run measures: one pair's broker ratio moves
#: 0.40-0.60 on this shared machine, so the run's figure is the median of its pairs'.
REPEATS = 3


def run(*, quick: bool, workdir: Path, in_flight: int = 4, repeats: int = REPEATS,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every setting ``repeats`` times, alternating, on the benchmark's own broker node (quick: once, shared)."""
    epochs, data = (1, "synthetic") if quick else (5, DATASET)
    rows: list[dict[str, Any]] = []
    shared = contextlib.nullcontext(node.Node(AMQP_URL, None))
    with (shared if quick else node.own_node(cpujobs.warm_up(workdir))) as broker:
        for attempt in range(1 if quick else repeats):
            for most in SETTINGS:
                spec = jobs.JobSpec(model="mlp", clients=1, in_flight=in_flight, epochs=epochs, dataset=data,
                                    options=("--coalesce", str(most)))
                log(f"bench coalesce: coalesce {most}, K={in_flight}, run {attempt + 1}")
                row = node.on_fresh_wal(broker, lambda: cpujobs.run(spec, workdir, url=broker.url,
                                                                    broker_pid=broker.pid))
                rows.append({"coalesce": most, "run": attempt + 1,
                             "messages_per_sample": row["worker_messages"] / (row["samples"] or float("nan")),
                             **cpujobs.figures(row)})
    against_coalesce_1(rows)
    return {"quick": quick, "in_flight": in_flight, "epochs": epochs, "dataset": data, "rows": rows,
            "median": medians(rows), "machine": machine()}


def medians(rows: list[dict[str, Any]]) -> dict[int, dict[str, float | None]]:
    """Per setting, the median over the run's pairs of its broker and total CPU ratios (None if unmeasured)."""
    return {most: {key: median([r[key] for r in rows if r["coalesce"] == most])
                   for key in ("broker_ratio", "cpu_ratio")} for most in SETTINGS}


def against_coalesce_1(rows: list[dict[str, Any]]) -> None:
    """Each row's total and broker CPU against the coalesce 1 row of its own pair."""
    for row in rows:
        base = next(r for r in rows if r["run"] == row["run"] and r["coalesce"] == SETTINGS[0])
        row["cpu_ratio"] = ratio(row["cpu_us_per_sample"], base["cpu_us_per_sample"])
        row["broker_ratio"] = ratio(row["cpu_by_party"].get("broker", {}).get("total"),
                                    base["cpu_by_party"].get("broker", {}).get("total"))


def markdown(r: dict[str, Any], command: str) -> str:
    """The section docs/benchmarks.md keeps between its markers."""
    m = r["machine"]
    where = "the shared broker" if r["quick"] else "a RabbitMQ node of the benchmark's own"
    lines = [START, "## Coalescing (`splitmq bench coalesce`)", "",
             sections.provenance(command, m, quick=r["quick"]) +
             f"MLP, one owner, K={r['in_flight']}, {r['epochs']} epochs, {r.get('dataset', DATASET)} data, "
             f"checkpoints on, real `splitmq server` + `splitmq worker` processes on {where}, each setting run in "
             "turn. Messages and bytes: what the worker sent and received per training sample (a batch is 64 "
             "samples). CPU: each thread's run time from `/proc` "
             "(`schedstat`, to the nanosecond), summed per process, over the 20%-80% window (worker and trainer "
             "split into the loop's main thread and pika's I/O thread; broker = `beam.smp`). Accuracy: the trained "
             "segments on the owner's test split. Raw results: `docs/benchmarks-coalesce.json`.", "",
             "| coalesce | run | messages per sample | bytes per sample | test accuracy | worker µs (main / pika) | "
             "trainer µs (main / pika) | broker µs | broker vs coalesce 1 | total µs/sample | CPU vs coalesce 1 "
             "| samples/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        acc = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "n/a"
        total = f"{row['cpu_us_per_sample']:.0f}" if row["cpu_us_per_sample"] else "n/a"
        ratio = f"{row['cpu_ratio']:.2f}" if row["cpu_ratio"] else "n/a"
        broker = f"{row['broker_ratio']:.2f}" if row["broker_ratio"] else "n/a"
        lines.append(f"| {row['coalesce']} | {row['run']} | {row['messages_per_sample']:.4f} | "
                     f"{row['bytes_per_sample']:,.0f} | {acc} | {cpujobs.party_cells(row['cpu_by_party'])} | "
                     f"{broker} | {total} | {ratio} | {row['samples_per_second']:,.0f} |")
    notes = node.rows_note([(f"coalesce {row['coalesce']} run {row['run']}", row) for row in r["rows"]])
    lines += ["", *_median_line(r), *notes,
              "K > 1 is asynchronous: accuracy moves a little from run to run with the order in which gradients "
              "arrive, coalesced or not; coalesced, a bundle's gradients are 0..3 updates stale instead of about 3 "
              "(`tests/test_coalesce.py` asserts coalescing loses at most 0.3 points at 3 epochs; measured +1.0).", END]
    return "\n".join(lines) + "\n"


def _median_line(r: dict[str, Any]) -> list[str]:
    """The run's figures: each setting's median ratios over its pairs (a pair's own moves with the machine)."""
    cells = []
    for most, m in medians(r["rows"]).items():  # from the rows, as the JSON of a run before the median has them
        runs = sum(1 for row in r["rows"] if row["coalesce"] == most)
        if most == SETTINGS[0] or not runs:
            continue
        broker = f"{m['broker_ratio']:.2f}" if m["broker_ratio"] else "n/a"
        total = f"{m['cpu_ratio']:.2f}" if m["cpu_ratio"] else "n/a"
        pairs = f"{runs} pair" + ("s" if runs != 1 else "")
        cells.append(f"coalesce {most} against coalesce {SETTINGS[0]}, median of {pairs}: broker CPU per sample "
                     f"**{broker}**, total CPU per sample **{total}**")
    return ["; ".join(cells) + ".", ""] if cells else []


def write(r: dict[str, Any], command: str, out_md: Path, out_json: Path) -> None:
    """Replace (or append) the coalescing section of ``out_md``; raw results in ``out_json``."""
    sections.write("coalesce", markdown(r, command), r, out_md, out_json)


if __name__ == "__main__":  # the same as ``splitmq bench coalesce``, which the page and the docs name
    from splitmq.workers import cli
    raise SystemExit(cli.main(["bench", "coalesce", *sys.argv[1:]]))
