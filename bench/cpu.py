"""``splitmq bench cpu``: CPU per sample per party, next to what the same work costs without splitmq.

What a deployment pays per sample is CPU, and on a shared 2-core machine it is far steadier
than wall-clock rates. One run measures, on the benchmark's own broker node (``bench.node``,
so ``beam.smp``'s CPU is this run's alone), in this order:

1. the in-process references (``bench.hotloops``): local training in one process; the bottom
   alone and the top alone in a hot loop (the parties' own Stages, no transport); validation of
   one real Forward and Backward against a memcpy of it; then the parties' loops in this process
   over the in-memory broker (``bench.loopcost``: the real roles and loop, no sockets, pika or
   RabbitMQ), K=1 and K=4, and K=4 once more phase by phase (``bench.loopphases``);
2. the raw pika ceiling (``bench.ceiling``: a driver and an echo process, no splitmq code) at
   the job's message sizes: quorum + persistent + confirms with 1 and 4 in flight, and
   transient with 4; CPU of driver, echo and broker;
3. splitmq with its defaults (MLP, one owner, K=1 and K=4) as real ``splitmq server`` +
   ``splitmq worker`` processes (``bench.cpujobs``): worker, trainer (each split into the loop's
   main thread and pika's I/O thread) and broker; then K=4 with ``coalesce = 1`` (one batch per
   message, the default before coalescing: what coalescing saves).

CPU is each thread's run time from ``/proc`` (``schedstat``) over the steady state (20%-80% of the samples,
``bench.cputime``).
The ratios T1-T5 (issue 14) compare splitmq with the sum of its references; wall-clock rates
are kept as context. The section it writes into docs/benchmarks.md sits between markers and is
kept when the main suite regenerates the page.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from splitmq.bench import ceiling, cpujobs, cputime, hotloops, jobs, loopcost, loopphases, node, sections
from splitmq.bench.common import AMQP_URL, BATCH_SIZE, DATASET, machine
from splitmq.bench.suite import clean
from splitmq.shared.config import JobConfig

START, END = sections.markers("cpu")
MODEL = "mlp"
#: splitmq's windows measured (the last is the one the ratios use).
WINDOWS = (1, 4)
#: The ceiling rows: (mode, in flight).
CEILINGS = (("durable", 1), ("durable", 4), ("transient", 4))
#: The job measured after the defaults: (in flight, batches per message), one batch per message.
COMPARED = (4, 1)
#: The defaults' batches per message (rows written before coalescing was the default hold none: 1).
DEFAULT_COALESCE = JobConfig().coalesce
#: Epochs per splitmq job (long enough for a steady state of several seconds at either K).
EPOCHS = 6
#: Seconds per timed loop: hot loops and each ceiling row.
SECONDS = 4.0
#: Issue 14's targets: every ratio at or below its bound.
TARGETS = {"t1": 1.3, "t2": 1.4, "t3": 1.3, "t4": 1.05, "t5": 2.0}
LABELS = {
    "t1": "T1 total CPU/sample, splitmq K=4 ÷ (local training + durable ceiling K=4)",
    "t2": "T2 worker ÷ (bottom hot loop + ceiling driver), K=4",
    "t3": "T3 trainer ÷ (top hot loop + ceiling echo), K=4",
    "t4": "T4 broker, splitmq K=4 ÷ durable ceiling K=4",
    "t5": "T5 trainer's validation of one Forward ÷ memcpy of it",
}


@contextlib.contextmanager
def _broker(quick: bool, workdir: Path) -> Iterator[node.Node]:
    """The benchmark's own node; quick mode uses the shared broker (no broker CPU: it is not ours alone)."""
    if quick:
        yield node.Node(AMQP_URL, None)
        return
    with node.own_node(cpujobs.warm_up(workdir)) as n:
        yield n


def run(*, quick: bool, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every contender once, in one run; the result is what docs/benchmarks-cpu.json holds."""
    seconds, epochs = (0.3, 1) if quick else (SECONDS, EPOCHS)
    data = "synthetic" if quick else DATASET
    out: dict[str, Any] = {"quick": quick, "model": MODEL, "dataset": data, "epochs": epochs, "seconds": seconds,
                           "machine_at_start": machine()}
    log("bench cpu: in-process references (local, bottom, top, validation)...")
    out["references"] = hotloops.run(MODEL, seconds, data, in_flight=WINDOWS[-1])
    refs = out["references"]
    out["loops"] = []
    for k in WINDOWS[-1:] if quick else WINDOWS:
        log(f"bench cpu: the parties' loops in this process, no transport, K={k}...")
        out["loops"].append(loopcost.run(MODEL, data, in_flight=k, epochs=3 if quick else loopcost.EPOCHS))
    log(f"bench cpu: the trainer's work at its least, no party loop, K={WINDOWS[-1]}...")
    out["least_trainer"] = loopcost.least_trainer(MODEL, data, in_flight=WINDOWS[-1],
                                                  epochs=1 if quick else loopcost.EPOCHS)
    log(f"bench cpu: the parties' loops in this process phase by phase, K={WINDOWS[-1]}...")
    out["loop_phases"] = loopphases.run(MODEL, data, in_flight=WINDOWS[-1], epochs=3 if quick else loopcost.EPOCHS)
    with _broker(quick, workdir) as broker:
        out["broker_own_node"] = broker.pid is not None
        out["ceiling"] = []
        for mode, k in CEILINGS:
            log(f"bench cpu: raw pika ceiling, {mode}, {k} in flight...")
            out["ceiling"].append(node.on_fresh_wal(broker, lambda: _ceiling(
                broker, mode, k, refs["request_bytes"], refs["reply_bytes"], seconds)))
        rows = [(k, DEFAULT_COALESCE, "durable") for k in (WINDOWS[-1:] if quick else WINDOWS)]
        if not quick:
            rows += [(*COMPARED, "durable"), (WINDOWS[-1], DEFAULT_COALESCE, "transient")]
        out["splitmq"] = []
        for k, n, delivery in rows:
            log(f"bench cpu: splitmq K={k} coalesce {n} delivery {delivery}, {epochs} epochs...")
            spec = jobs.JobSpec(model=MODEL, clients=1, in_flight=k, epochs=epochs, dataset=data,
                                options=("--coalesce", str(n), "--delivery", delivery))
            row = node.on_fresh_wal(broker, lambda: cpujobs.run(spec, workdir, url=broker.url,
                                                                broker_pid=broker.pid))
            out["splitmq"].append({"in_flight": k, "coalesce": n, "delivery": delivery,
                                   "samples_per_second": row["samples_per_second"],
                                   "bytes_per_sample": row["worker_bytes_per_sample"], "accuracy": row["accuracy"],
                                   "cpu": row["cpu"], "wal_rollovers": row["wal_rollovers"],
                                   "settled_s": row["settled_s"]})
    out["ratios"] = ratios(out)
    out["machine"] = machine()
    cleaned: dict[str, Any] = clean(out)
    return cleaned


def _ceiling(broker: node.Node, mode: str, k: int, request_bytes: int, reply_bytes: int,
             seconds: float) -> dict[str, Any]:
    """One ceiling row with the CPU of driver (this process's main thread), echo and broker."""
    samplers: list[cputime.Sampler] = []

    def watch(echo_pid: int, driver: Any) -> None:
        pids = {"driver": os.getpid(), "echo": echo_pid, **({"broker": broker.pid} if broker.pid else {})}
        samplers.append(cputime.Sampler(pids, lambda: float(len(driver.rtts))).start())

    try:
        row = ceiling.round_trips(broker.url, mode=mode, in_flight=k, request_bytes=request_bytes,
                                  reply_bytes=reply_bytes, seconds=seconds, on_start=watch)
    finally:
        for sampler in samplers:
            sampler.stop()
    cpu = cputime.window(samplers[0].snapshots, row["round_trips"], per=BATCH_SIZE) if samplers else None
    return {**row, "samples_per_second": row["per_second"] * BATCH_SIZE, "cpu": cpu}


# ---- the figures the report and the ratios read ------------------------------------------------

def _us(row: dict[str, Any] | None, party: str, group: str = "total") -> float | None:
    """µs per sample of ``party`` (thread ``group``) in a row's steady-state window; None if not measured."""
    cpu = (row or {}).get("cpu") or {}
    value = cpu.get("us_per_sample", {}).get(party, {}).get(group)
    return float(value) if value is not None else None


def loop_us(r: dict[str, Any], k: int, party: str) -> float | None:
    """µs per sample of ``party``'s loop in process (``bench.loopcost``) at K=``k``; None if not measured."""
    row = next((x for x in r.get("loops", []) if x["in_flight"] == k), None)
    value = ((row or {}).get("us_per_sample") or {}).get(party)
    return float(value) if value is not None else None


def ceiling_row(r: dict[str, Any], mode: str, k: int) -> dict[str, Any] | None:
    return next((c for c in r["ceiling"] if c["mode"] == mode and c["in_flight"] == k), None)


def splitmq_row(r: dict[str, Any], k: int, coalesce: int = DEFAULT_COALESCE,
                delivery: str = "durable") -> dict[str, Any] | None:
    return next((s for s in r["splitmq"] if s["in_flight"] == k and s.get("coalesce", 1) == coalesce
                 and s.get("delivery", "durable") == delivery), None)


def parties(row: dict[str, Any] | None, *, ceiling_row: bool) -> dict[str, float | None]:
    """worker/trainer/broker µs per sample of a row: a ceiling's driver is its worker (its main
    thread: its one I/O loop), its echo its trainer."""
    worker, trainer = ("driver", "echo") if ceiling_row else ("worker", "trainer")
    group = "main" if ceiling_row else "total"
    out = {"worker": _us(row, worker, group), "trainer": _us(row, trainer), "broker": _us(row, "broker")}
    parts = [v for v in out.values()]
    out["total"] = sum(v for v in parts if v is not None) if all(v is not None for v in parts) else None
    return out


def _ratio(a: float | None, *b: float | None) -> float | None:
    if a is None or any(x is None for x in b):
        return None
    den = sum(x for x in b if x is not None)
    return a / den if den > 0 else None


def ratios(r: dict[str, Any]) -> dict[str, Any]:
    """T1-T5 at K=4 (and T1-T4 at K=1 for context, against the ceiling with 1 in flight)."""
    refs = r["references"]
    local_us = refs["local"]["cpu_us_per_sample"]
    bottom_us, top_us = refs["bottom"]["cpu_us_per_sample"], refs["top"]["cpu_us_per_sample"]
    out: dict[str, Any] = {}
    for key, k, n in ([(f"k{k}", k, DEFAULT_COALESCE) for k in WINDOWS]
                      + [(f"k{COMPARED[0]}_coalesce{COMPARED[1]}", *COMPARED)]):
        ours = parties(splitmq_row(r, k, n), ceiling_row=False)
        ceil = parties(ceiling_row(r, "durable", k), ceiling_row=True)
        out[key] = {"t1": _ratio(ours["total"], local_us, ceil["total"]),
                        "t2": _ratio(ours["worker"], bottom_us, ceil["worker"]),
                        "t3": _ratio(ours["trainer"], top_us, ceil["trainer"]),
                        "t4": _ratio(ours["broker"], ceil["broker"])}
    k = WINDOWS[-1]
    durable, transient = (parties(splitmq_row(r, k, delivery=d), ceiling_row=False) for d in ("durable", "transient"))
    out[f"k{k}_transient"] = {  # against the same job durable, and the raw ceiling's broker in the same mode
        "total_vs_durable": _ratio(transient["total"], durable["total"]),
        "broker_vs_durable": _ratio(transient["broker"], durable["broker"]),
        "t4": _ratio(transient["broker"], parties(ceiling_row(r, "transient", k), ceiling_row=True)["broker"])}
    out.update(out[f"k{WINDOWS[-1]}"])
    out["t5"] = refs["validation"]["trainer"]["validation_over_memcpy"]
    out["met"] = {t: (out[t] <= bound if out[t] is not None else None) for t, bound in TARGETS.items()}
    return out


# ---- the section of docs/benchmarks.md ----------------------------------------------------------

def _n(x: float | None, fmt: str = "{:.0f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _split(row: dict[str, Any] | None, party: str) -> str:
    """``total (main / pika)`` of a splitmq party."""
    return f"{_n(_us(row, party))} ({_n(_us(row, party, 'main'))} / {_n(_us(row, party, 'pika'))})"


#: What the stash row's label adds for each staleness correction.
_CORRECTIONS = {"none": "", "dc": " + delay compensation", "lr": " + staleness-scaled step"}


def table(r: dict[str, Any]) -> list[str]:
    """One row per contender: worker, trainer and broker µs per sample, and wall-clock samples/s."""
    refs = r["references"]
    local_us, bottom_us = refs["local"]["cpu_us_per_sample"], refs["bottom"]["cpu_us_per_sample"]
    stash_us, top_us = refs["bottom_stash"]["cpu_us_per_sample"], refs["top"]["cpu_us_per_sample"]
    k = refs["bottom_stash"]["in_flight"]
    # JSON from before the default became plain stashing (2026-11-24) does not name its correction: it was dc
    named = str(refs["bottom_stash"].get("correction", "dc"))
    correction = _CORRECTIONS.get(named, f" + {named}")
    lines = ["| contender | worker µs | trainer µs | broker µs | total µs/sample | samples/s (wall, context) |",
             "|---|---:|---:|---:|---:|---:|",
             f"| local training, one process | | | | {_n(local_us)} | {refs['local']['samples_per_second']:,.0f} |",
             f"| bottom alone / top alone, hot loop (no transport) | {_n(bottom_us)} | {_n(top_us)} | | "
             f"{_n(bottom_us + top_us)} | |",
             f"| bottom alone, {k} in flight (weight stash{correction}, as the worker at K={k}) | "
             f"{_n(stash_us)} | | | | |"]
    for n in WINDOWS:
        w, t = loop_us(r, n, "worker"), loop_us(r, n, "trainer")
        if w is not None or t is not None:
            lines.append(f"| splitmq's loops in one process, K={n} (the real roles and loop over the in-memory "
                         f"broker: no sockets, pika or RabbitMQ) | {_n(w)} | {_n(t)} | | "
                         f"{_n(w + t if w is not None and t is not None else None)} | |")
    least = r.get("least_trainer") or {}
    if least.get("us_per_sample") is not None:
        lines.append(f"| the trainer's work at its least, K={least['in_flight']}: decode, check, its Stage, encode "
                     f"(no roles, ledger, outbox, acks or checkpoints) | | {_n(least['us_per_sample'])} | | | |")
    for mode, n in CEILINGS:
        row = ceiling_row(r, mode, n)
        p = parties(row, ceiling_row=True)
        lines.append(f"| raw pika ceiling, {'quorum + persistent + confirms' if mode == 'durable' else mode}, "
                     f"K={n} (driver / echo) | {_n(p['worker'])} | {_n(p['trainer'])} | {_n(p['broker'])} | "
                     f"{_n(p['total'])} | {_n(row['samples_per_second'] if row else None, '{:,.0f}')} |")
    k = WINDOWS[-1]
    for n, c, d in [(n, DEFAULT_COALESCE, "durable") for n in WINDOWS] + [(*COMPARED, "durable"),
                                                                          (k, DEFAULT_COALESCE, "transient")]:
        row = splitmq_row(r, n, c, d)
        if row is None and ((n, c) == COMPARED or d == "transient"):
            continue  # a row a quick run (or JSON from before it) does not have
        p = parties(row, ceiling_row=False)
        label = (f"splitmq {'sync ' if n == 1 else ''}K={n}{f', coalesce {c}' if (n, c) == COMPARED else ''}"
                 f"{', delivery = transient' if d == 'transient' else ''} (main / pika)")
        lines.append(f"| {label} | {_split(row, 'worker')} | "
                     f"{_split(row, 'trainer')} | {_n(p['broker'])} | {_n(p['total'])} | "
                     f"{_n(row['samples_per_second'] if row else None, '{:,.0f}')} |")
    return lines


def targets(r: dict[str, Any]) -> list[str]:
    q = r["ratios"]
    lines = ["| ratio | this run | target | |", "|---|---:|---:|---|"]
    for t, bound in TARGETS.items():
        verdict = "not run" if q[t] is None else ("met" if q[t] <= bound else "**missed**")
        lines.append(f"| {LABELS[t]} | {_n(q[t], '{:.2f}')} | ≤ {bound:g} | {verdict} |")
    k1 = q.get("k1", {})
    lines += ["", "At K=1 (against the durable ceiling with 1 in flight), for context: "
              + ", ".join(f"{t.upper()} {_n(k1.get(t), '{:.2f}')}" for t in ("t1", "t2", "t3", "t4")) + "."]
    transient = q.get(f"k{WINDOWS[-1]}_transient", {})
    if transient.get("total_vs_durable") is not None:
        lines += ["", f"With `delivery = transient` at K={WINDOWS[-1]} (training batches and answers in the broker's "
                  "memory only; docs/guarantees.md says what it gives up): total CPU per sample "
                  f"{_n(transient['total_vs_durable'], '{:.2f}')} of the durable job's, the broker's "
                  f"{_n(transient['broker_vs_durable'], '{:.2f}')}; its broker against the raw transient ceiling's "
                  f"(T4 in that mode) {_n(transient.get('t4'), '{:.2f}')}."]
    k, n = COMPARED
    single = q.get(f"k{k}_coalesce{n}", {})
    if single.get("t1") is not None:
        lines += ["", f"At K={k} with `coalesce = {n}` (one batch per message; the defaults coalesce up to "
                  f"{DEFAULT_COALESCE}; against the same references): "
                  + ", ".join(f"{t.upper()} {_n(single.get(t), '{:.2f}')}" for t in ("t1", "t2", "t3", "t4")) + "."]
    return lines


def decomposition(r: dict[str, Any]) -> list[str]:
    """Where each party's CPU goes at K=4: its Stage, the loop around it, and what the real process adds."""
    k, refs = WINDOWS[-1], r["references"]
    stage = {"worker": refs["bottom_stash"]["cpu_us_per_sample"], "trainer": refs["top"]["cpu_us_per_sample"]}
    real = parties(splitmq_row(r, k), ceiling_row=False)
    parts = []
    for party in ("worker", "trainer"):
        loop, whole = loop_us(r, k, party), real[party]
        if loop is None or whole is None:
            return []
        parts.append(f"the {party} {_n(whole)} µs: its Stage {_n(stage[party])} (hot loop), the loop around it "
                     f"{_n(loop - stage[party], '{:+.0f}')} (in process, no transport), the transport and the shared "
                     f"cores {_n(whole - loop, '{:+.0f}')} (the real process less the loop in process)")
    least, trainer_loop = (r.get("least_trainer") or {}).get("us_per_sample"), loop_us(r, k, "trainer")
    if least is not None and trainer_loop is not None and real["trainer"] is not None:
        bookkeeping = trainer_loop - least
        echo = parties(ceiling_row(r, "durable", k), ceiling_row=True)["trainer"]
        parts.append(f"of the trainer's loop, {_n(bookkeeping, '{:.1f}')} µs is the party loop's own bookkeeping "
                     f"(the loop in process less its work at its least): with none of it, T3 would read "
                     f"{_n(_ratio(real['trainer'] - bookkeeping, stage['trainer'], echo), '{:.2f}')}")
    return [f"Where each party's CPU goes at K={k}, from the rows above: " + "; ".join(parts) + "."]


def wal_note(r: dict[str, Any]) -> list[str]:
    """What the broker carried into each row: its quorum-queue log's rollovers, and whether it was quiet."""
    return node.rows_note([(f"ceiling {c['mode']} K={c['in_flight']}", c) for c in r["ceiling"]] + [
        (f"splitmq K={s['in_flight']}{' coalesce 1' if s.get('coalesce') == 1 else ''}"
         f"{' transient' if s.get('delivery') == 'transient' else ''}", s) for s in r["splitmq"]])


def validation(r: dict[str, Any]) -> list[str]:
    v = r["references"]["validation"]
    lines = ["| party | message | bytes | gate's own checks µs | role's check µs | validation µs | memcpy µs | "
             "validation / memcpy | whole gate µs (decode included) | `wire.decode` µs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for party, checks in (("trainer", "check_forward"), ("worker", "check_gradient")):
        x = v[party]
        lines.append(f"| {party} | {x['message']} (`{checks}`) | {x['message_bytes']:,} | {x['gate_checks_us']:.1f} | "
                     f"{x['checks_us']:.1f} | {x['validation_us']:.1f} | {x['memcpy_us']:.1f} | "
                     f"{x['validation_over_memcpy']:.2f} | {x['gate_us']:.1f} | {x['decode_us']:.1f} |")
    return lines


def _loops_text(r: dict[str, Any]) -> str:
    if not r.get("loops"):
        return ""
    return (" Loops in one process (`bench/loopcost.py`): the roles and loop `splitmq worker` and `splitmq server` "
            f"build, checkpoints on, training the same job for {r['loops'][0]['epochs']} epochs in two threads of "
            "the bench over the in-memory broker; each thread's CPU over the same 20%-80% window.")


def markdown(r: dict[str, Any], command: str) -> str:
    """The section docs/benchmarks.md keeps between its markers."""
    m = r["machine"]
    where = ("a RabbitMQ node of the benchmark's own (`beam.smp`'s CPU is this run's alone)" if r["broker_own_node"]
             else "the shared broker (its CPU is not measured)")
    lines = [START, "## CPU per sample per party (`splitmq bench cpu`)", "",
             f"Generated by `{command}` on {m['date_utc']} UTC at commit `{m['commit']}`"
             f"{' (QUICK smoke mode: numbers mean nothing)' if r['quick'] else ''}; load at start "
             f"`{r['machine_at_start']['uptime']}`, at end `{m['uptime']}`. Raw results: `docs/benchmarks-cpu.json`.",
             "",
             f"One run, same machine, every contender one after the other: {r['model'].upper()} with splitmq's "
             f"defaults, one owner, batch {BATCH_SIZE}, {r['dataset']} data, one torch thread per process, on {where}. "
             "splitmq: real `splitmq server` + `splitmq worker` processes (durable quorum queues, persistent "
             f"confirmed messages, checkpoints), {r['epochs']} epochs; CPU = each thread's run time from `/proc` "
             "(`schedstat`, to the nanosecond) per process and per thread over the 20%-80% window of the samples "
             "(main = the loop's thread, pika = its I/O "
             "thread; the total also holds the metrics server and torch's threads). Raw pika ceiling "
             f"(`bench/ceiling.py`): a driver and an echo process moving bodies of the job's Forward and Backward "
             f"sizes ({r['references']['request_bytes']:,} / {r['references']['reply_bytes']:,} bytes), reading "
             "their sockets 64 KB at a time and keeping freed heap as splitmq does, "
             f"for {r['seconds']:g} s per row; its driver's figure is its one I/O thread. Hot loops: the calling "
             f"thread's CPU over {r['seconds']:g} s of the parties' own Stages, no transport.{_loops_text(r)}", ""]
    where_it_goes = decomposition(r)
    lines += table(r) + [""] + wal_note(r) + (where_it_goes + [""] if where_it_goes else []) + targets(r)
    phases = loopphases.table(r.get("loop_phases"))
    if phases:
        lines += ["", f"The loops in one process phase by phase (`bench/loopphases.py`, K={WINDOWS[-1]}): the same job "
                  "once more with the loop's parts wrapped, each booking its own thread CPU less that of the parts "
                  "it calls, over the whole run; compare the Stage with the hot loops above:", ""] + phases
    lines += ["", "Validation per message, timed on the real functions (`workers/gate.py`, `shared/validate.py`) "
              "and a real message of the job's size (the gate's own checks: `gate.admit` with its `wire.decode` "
              "handing back the decoded message; decoding is the codec's cost, section 5):", ""]
    lines += validation(r) + ["", END]
    return "\n".join(lines) + "\n"


def write(r: dict[str, Any], command: str, out_md: Path, out_json: Path) -> None:
    """Replace (or append) the cpu section of ``out_md``; raw results in ``out_json``."""
    sections.write("cpu", markdown(r, command), r, out_md, out_json)
