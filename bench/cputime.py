"""CPU time of processes and their threads, read from ``/proc``, and steady-state windows of it.

What a deployment pays per sample is CPU, and on a shared 2-core machine CPU time is far
steadier than wall-clock rates: each live thread's run time from ``/proc/<pid>/task/<tid>/schedstat``
(to the nanosecond; ``utime + stime`` in ticks where there is none), finished threads by the
ticks ``/proc/<pid>/stat`` kept for them. A splitmq party's threads are told apart by name: the main
thread (tid = pid) runs the loop and the model; the transport's I/O thread is named
``pika-<party>`` (``shared.broker`` names it); everything else (the metrics server, torch's
pool) is ``other``. A ``Sampler`` reads several processes together with a progress count
(samples applied), every ``PERIOD_S``; ``window`` picks the snapshots nearest two fractions of
the run (20% and 80%: past start-up, before the tail) and gives µs of CPU per sample.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

#: Clock ticks per second of utime/stime (100 on Linux).
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
#: How often a Sampler reads (a worker's /metrics scrape costs it ~1 ms: 4 per second is noise).
PERIOD_S = 0.25
#: The steady-state window, as fractions of the samples a run applies.
WINDOW = (0.2, 0.8)
GROUPS = ("main", "pika", "other")


def stat_ticks(path: str) -> int:
    """utime + stime of a /proc stat file (fields 14 and 15; the name in field 2 may hold spaces)."""
    with open(path, "rb") as f:
        text = f.read()
    fields = text[text.rindex(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def _run_s(path: str) -> float | None:
    """On-CPU seconds of a thread to the nanosecond (``schedstat``'s first field), None where the kernel keeps none."""
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def process_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of process ``pid``: ``total`` and by thread group (main, pika, other).

    Each live thread counts its ``schedstat`` run time (nanoseconds; its ``utime + stime``
    in 10-ms ticks where the kernel keeps no schedstat): over a window of 2-3 s a party's
    ticks number 20-30, too few for a figure to the percent. Threads that have ended count
    in ``other`` by the ticks the process kept for them.

    Raises:
        OSError: the process is gone.
    """
    process_ticks = stat_ticks(f"/proc/{pid}/stat")
    out, live_ticks = {"main": 0.0, "pika": 0.0, "other": 0.0}, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", "rb") as f:
                name = f.read().strip()
            ticks = stat_ticks(f"/proc/{pid}/task/{tid}/stat")
        except OSError:  # the thread ended between the listing and the read
            continue
        live_ticks += ticks
        run = _run_s(f"/proc/{pid}/task/{tid}/schedstat")
        group = "main" if int(tid) == pid else "pika" if name.startswith(b"pika-") else "other"
        out[group] += run if run is not None else ticks * TICK_S
    out["other"] += max(0, process_ticks - live_ticks) * TICK_S
    out["total"] = out["main"] + out["pika"] + out["other"]
    return out


@dataclass(frozen=True)
class Snapshot:
    at: float                                 # monotonic seconds
    progress: float                           # samples applied so far
    cpu: Mapping[str, Mapping[str, float]]    # party -> group -> CPU seconds


@dataclass
class Sampler:
    """Reads ``pids``' CPU and ``progress()`` together every ``period_s`` on its own thread."""

    pids: Mapping[str, int]
    progress: Callable[[], float | None]
    period_s: float = PERIOD_S
    snapshots: list[Snapshot] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def take(self) -> None:
        done = self.progress()
        if done is None:
            return
        cpu = {}
        for party, pid in self.pids.items():
            try:
                cpu[party] = process_cpu(pid)
            except OSError:
                return
        self.snapshots.append(Snapshot(time.monotonic(), done, cpu))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.take()

    def start(self) -> "Sampler":
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def window(snapshots: list[Snapshot], total: float, *, per: float = 1.0,
           bounds: tuple[float, float] = WINDOW) -> dict[str, object] | None:
    """µs of CPU per unit of progress (a sample; ``per`` samples per unit) over the steady state.

    The window runs from the first snapshot at or past ``bounds[0]`` of ``total`` to the last one
    at or before ``bounds[1]``. Returns None when fewer than two snapshots fall inside it.
    """
    inside = [s for s in snapshots if bounds[0] * total <= s.progress <= bounds[1] * total]
    if len(inside) < 2 or inside[-1].progress <= inside[0].progress:
        return None
    a, b = inside[0], inside[-1]
    units = (b.progress - a.progress) * per
    parties: dict[str, dict[str, float]] = {}
    for party in b.cpu:
        parties[party] = {g: (b.cpu[party][g] - a.cpu[party][g]) / units * 1e6 for g in b.cpu[party]}
    return {"samples": units, "seconds": b.at - a.at, "samples_per_second": units / (b.at - a.at),
            "us_per_sample": parties,
            "total_us_per_sample": sum(p["total"] for p in parties.values())}
