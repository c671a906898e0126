"""Where the worker's and the trainer's main-thread CPU goes per sample, in the steady state.

``python -m splitmq.bench.cpuprofile [--in-flight 4] [--epochs 6] [--compress-activations int8 ...]``
runs one MLP job with splitmq's defaults on the benchmark's own broker node, with both ``splitmq worker`` and
``splitmq server`` started through this module's wrapper (``--wrap``): it runs the command
unchanged, and profiles its main thread with cProfile timed by that thread's CPU clock
(``time.thread_time``: time spent waiting counts nothing) between SIGUSR1 and SIGUSR2. The
job sends SIGUSR1 at 20% of the samples and SIGUSR2 at 80%, the window ``splitmq bench cpu``
measures. It prints, per party, µs per sample by function (own time and cumulative), and the
main threads' CPU per sample with and without the profiler's overhead (``/proc``, same window).

cProfile adds a fixed cost to every Python call, so many small calls look dearer than they
are; the ranking, not the last microsecond, is what it tells.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import runpy
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from splitmq.shared.config import JobConfig

#: Rows per party in the printed tables.
TOP = 25
#: Which clock the wrapped parties' profiler reads: ``cpu`` (the thread's CPU time: a system call
#: per event, so Python-heavy code looks several times dearer) or ``wall`` (cheap per event, but
#: waits and preemption count: read it with the waiting functions left out).
CLOCK_ENV = "SPLITMQ_PROFILE_CLOCK"


def _wrap(out: str, argv: list[str]) -> int:
    """Run ``python -m splitmq ARGS`` in this process; profile its main thread between USR1 and USR2."""
    prof = cProfile.Profile(time.perf_counter if os.environ.get(CLOCK_ENV) == "wall" else time.thread_time)
    state = {"on": False, "dumped": False}

    def start(_sig: int, _frame: Any) -> None:
        if not state["on"]:
            state["on"] = True
            prof.enable()

    def stop(_sig: int, _frame: Any) -> None:
        if state["on"] and not state["dumped"]:
            prof.disable()
            prof.dump_stats(out)
            state["dumped"] = True

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    if argv[:2] != ["-m", "splitmq"]:
        raise SystemExit(f"--wrap expects '-m splitmq ...', got {argv[:2]}")
    sys.argv = ["splitmq", *argv[2:]]
    try:
        runpy.run_module("splitmq", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        stop(0, None)
    return 0


def _job(in_flight: int, epochs: int, workdir: Path, coalesce: int, compress: tuple[str, str]) -> dict[str, Any]:
    """One job with both parties wrapped; the signals at 20%/80% of the samples; main-thread CPU."""
    from splitmq.bench import cpujobs, cputime, jobs, node
    from splitmq.bench.common import dataset

    spec = jobs.JobSpec(model="mlp", clients=1, in_flight=in_flight, epochs=epochs,
                        options=("--coalesce", str(coalesce), "--compress-activations", compress[0],
                                 "--compress-gradients", compress[1]))
    total = len(dataset(spec.dataset).train) * epochs
    profs = {"worker": workdir / "worker.prof", "trainer": workdir / "trainer.prof"}
    wrap = ("-m", "splitmq.bench.cpuprofile", "--wrap")
    samplers: list[cputime.Sampler] = []

    def watch(trainer: int, workers: list[int], port: int) -> None:
        pids = {"worker": workers[0], "trainer": trainer}
        sampler = cputime.Sampler(pids, lambda: cpujobs._samples(port)).start()
        samplers.append(sampler)
        for fraction, sig in ((cputime.WINDOW[0], signal.SIGUSR1), (cputime.WINDOW[1], signal.SIGUSR2)):
            while jobs.pid_alive(workers[0]) and (cpujobs._samples(port) or 0) < fraction * total:
                time.sleep(0.05)  # polling the worker's progress, ended by its exit
            for pid in pids.values():
                if jobs.pid_alive(pid):
                    os.kill(pid, sig)
        while jobs.pid_alive(workers[0]):
            time.sleep(0.2)
        sampler.stop()

    with node.own_node() as n:
        result = jobs.run_job(spec, workdir, url=n.url, watch=watch,
                              worker_prefix=(*wrap, str(profs["worker"])),
                              server_prefix=(*wrap, str(profs["trainer"])))
    window = cputime.window(samplers[0].snapshots, total) if samplers else None
    profiled = (cputime.WINDOW[1] - cputime.WINDOW[0]) * total   # samples between the two signals
    return {"row": jobs.aggregate(result), "profiles": profs, "window": window, "profiled_samples": profiled}


def table(prof: Path, samples: float, top: int = TOP) -> list[str]:
    """µs per sample by function: own time, and cumulative, the heaviest own times first."""
    raw: dict[Any, Any] = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]  # pstats keeps it untyped
    total = sum(v[2] for v in raw.values())
    lines = [f"profiled main-thread CPU: {total / samples * 1e6:.1f} µs/sample",
             "| function | calls/sample | own µs/sample | cumulative µs/sample |", "|---|---:|---:|---:|"]
    for (file, line, func), v in sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if file != "~" else "built-in"
        lines.append(f"| `{func}` ({where}) | {v[1] / samples:.3f} | {v[2] / samples * 1e6:.2f} | "
                     f"{v[3] / samples * 1e6:.2f} |")
    return lines


def _group(file: str, func: str) -> str:
    """Where a function's own time belongs: a splitmq module, a library, or torch's / Python's C code."""
    if file == "~":
        return "torch C ops" if "torch" in func or "Tensor" in func else "Python built-ins"
    parts = Path(file).parts
    for i, part in enumerate(parts):
        if part in ("shared", "workers", "bench") and "splitmq" not in parts[i + 1:i + 2]:
            return "splitmq " + "/".join(parts[i:])
        if part == "site-packages" and i + 1 < len(parts):
            return parts[i + 1] if parts[i + 1] != "torch" else "torch " + "/".join(parts[i + 2:i + 3])
    return "Python stdlib " + Path(file).name


def by_module(prof: Path, samples: float, top: int = TOP) -> list[str]:
    """Own time per sample summed by module: which code, ours or a library's, the CPU is spent in."""
    raw: dict[Any, Any] = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    groups: dict[str, float] = {}
    for (file, _line, func), v in raw.items():
        key = _group(file, func)
        groups[key] = groups.get(key, 0.0) + v[2]
    total = sum(groups.values())
    lines = ["| code | own µs/sample | share |", "|---|---:|---:|"]
    for key, own in sorted(groups.items(), key=lambda kv: kv[1], reverse=True)[:top]:
        lines.append(f"| {key} | {own / samples * 1e6:.2f} | {own / total:.0%} |")
    return lines


def ours(prof: Path, samples: float, top: int = TOP) -> list[str]:
    """splitmq's functions by cumulative time per sample (what each step of the loop costs in all)."""
    raw: dict[Any, Any] = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    mine = [kv for kv in raw.items() if _group(kv[0][0], kv[0][2]).startswith("splitmq")]
    lines = ["| function | calls/sample | cumulative µs/sample |", "|---|---:|---:|"]
    for (file, line, func), v in sorted(mine, key=lambda kv: kv[1][3], reverse=True)[:top]:
        lines.append(f"| `{func}` ({Path(file).parent.name}/{Path(file).name}:{line}) | {v[1] / samples:.3f} | "
                     f"{v[3] / samples * 1e6:.2f} |")
    return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["--wrap"]:
        return _wrap(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--coalesce", type=int, default=JobConfig().coalesce, help="batches per message (the job's)")
    p.add_argument("--compress-activations", default="none", help="the job's activation codec")
    p.add_argument("--compress-gradients", default="none", help="the job's gradient codec")
    p.add_argument("--keep", default=None, help="directory to keep the job's files and the .prof files in")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="the profiler's clock (see CLOCK_ENV)")
    a = p.parse_args(argv)
    os.environ[CLOCK_ENV] = a.clock  # the wrapped parties inherit it
    with tempfile.TemporaryDirectory(prefix="splitmq-cpuprofile-") as tmp:
        workdir = Path(a.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        out = _job(a.in_flight, a.epochs, workdir, a.coalesce, (a.compress_activations, a.compress_gradients))
        w = out["window"] or {}
        samples = out["profiled_samples"]
        print(f"MLP K={a.in_flight}, {a.epochs} epochs, compression {a.compress_activations} / "
              f"{a.compress_gradients}, {out['row']['samples_per_second']:,.0f} samples/s under the "
              f"profiler; profiled {samples:,.0f} samples (20%-80%)")
        for party, prof in out["profiles"].items():
            cpu = w.get("us_per_sample", {}).get(party, {})
            print(f"\n### {party}: /proc main {cpu.get('main', float('nan')):.1f} µs/sample, pika "
                  f"{cpu.get('pika', float('nan')):.1f} (profiled run)")
            if prof.exists() and samples:
                print("\n".join(["", "By code (own time):", "", *by_module(prof, samples), "",
                                  "splitmq functions by cumulative time:", "", *ours(prof, samples), "",
                                  "Functions by own time:", "", *table(prof, samples)]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
