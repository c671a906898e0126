"""Where the party loop's CPU goes, phase by phase: each part's own CPU per sample, loops in one process.

``bench.loopcost`` measures each party's loop as one number; this splits it. The same job runs
once more with a few of the loop's functions wrapped (``PHASES``). A wrapper reads its thread's
CPU clock on entry and on exit and books the call's *own* time: what it spent less what the
wrapped functions it called spent (``Ledger``). ``Party.run`` is wrapped too, so a thread's
phases add up to its whole loop and its "loop" row is everything not named: the turn itself,
the gate's other checks, the roles' ticks and waits, acks and timers.

Figures are over the whole run (the loop's start-up included: milliseconds in a run of seconds),
not ``loopcost``'s 20%-80% window. Each wrapped call costs about two reads of the thread's
clock, booked to the phase around it (mostly "loop"): the total reads a little higher than the
unwrapped run's, which the report shows beside it.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

from splitmq.bench import loopcost
from splitmq.bench.common import BATCH_SIZE

#: (module, function or Class.method, phase): what is wrapped, and the phase its own time counts to.
PHASES: tuple[tuple[str, str, str], ...] = (
    ("splitmq.workers.party", "Party.run", "loop: the turn, gate checks, roles' ticks and waits, acks, timers"),
    ("splitmq.workers.party", "Party._dispatch", "roles handling a message: ledger, answers, their steps"),
    ("splitmq.shared.stage", "Stage.forward", "Stage: forward, backward, optimizer step"),
    ("splitmq.shared.stage", "Stage.backward", "Stage: forward, backward, optimizer step"),
    ("splitmq.shared.stage", "Stage.loss_step", "Stage: forward, backward, optimizer step"),
    ("splitmq.shared.data", "SampleSet.batch", "data: gathering the batch's rows"),
    ("splitmq.shared.wire", "decode", "decoding (`wire.decode`)"),
    ("splitmq.shared.validate", "check_forward", "validation: the role's checks of a cut tensor"),
    ("splitmq.shared.validate", "check_gradient", "validation: the role's checks of a cut tensor"),
    ("splitmq.shared.codec", "CutCodec.incoming", "the cut codec (compression hook)"),
    ("splitmq.shared.codec", "CutCodec.outgoing", "the cut codec (compression hook)"),
    ("splitmq.shared.wire", "Message.encode", "encoding (`Message.encode`)"),
    ("splitmq.workers.outbox", "Outbox.flush", "outbox: publishing, its bookkeeping"),
    ("splitmq.workers.party", "Party._maybe_checkpoint", "checkpoints"),
)

_F = TypeVar("_F", bound=Callable[..., Any])


class Ledger:
    """Own CPU time and calls per (thread name, phase), from wrapped functions on any thread."""

    def __init__(self, clock: Callable[[], float] = time.thread_time) -> None:
        self.clock = clock
        self.own: collections.defaultdict[tuple[str, str], float] = collections.defaultdict(float)
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self._local = threading.local()

    def wrap(self, fn: _F, phase: str) -> _F:
        """``fn`` booking its own time (less that of wrapped calls inside it) to ``phase``."""
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            inner: list[float] = self._local.__dict__.setdefault("inner", [])  # per open call: wrapped time inside
            inner.append(0.0)
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = self.clock() - start
                key = (threading.current_thread().name, phase)
                self.own[key] += spent - inner.pop()
                self.calls[key] += 1
                if inner:
                    inner[-1] += spent
        return wrapped  # type: ignore[return-value]


def resolve(module: str, path: str) -> tuple[Any, str, Any]:
    """``(owner, name, function)`` for a phase's ``path`` in ``module``: the module or class holding
    it, and the function itself (a class's own, not one it inherits)."""
    owner: Any = importlib.import_module(module)
    *outer, name = path.split(".")
    for part in outer:
        owner = getattr(owner, part)
    return owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)


@contextlib.contextmanager
def wrapped(ledger: Ledger, phases: tuple[tuple[str, str, str], ...] = PHASES) -> Iterator[None]:
    """``phases`` wrapped into ``ledger`` while the block runs; the originals put back after it."""
    originals: list[tuple[Any, str, Any]] = []
    try:
        for module, path, phase in phases:
            owner, name, original = resolve(module, path)
            originals.append((owner, name, original))
            setattr(owner, name, ledger.wrap(original, phase))
        yield
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


def run(model: str, dataset_name: str, *, in_flight: int, epochs: int) -> dict[str, Any]:
    """The loops in one process (``loopcost.run``) with ``PHASES`` wrapped: µs per sample of each
    party's phases, calls per ``BATCH_SIZE`` samples, and the run's own window figure for comparison."""
    ledger = Ledger()
    with wrapped(ledger):
        whole = loopcost.run(model, dataset_name, in_flight=in_flight, epochs=epochs)
    party_of = {thread: party for party, thread in whole.pop("threads").items()}
    samples = whole["samples"]
    batches = samples / BATCH_SIZE
    out: dict[str, Any] = {"in_flight": in_flight, "epochs": epochs, "samples": samples,
                           "window_us_per_sample": whole["us_per_sample"], "us_per_sample": {}, "calls_per_batch": {}}
    for (thread, phase), seconds in ledger.own.items():
        party = party_of.get(thread)
        if party is None:  # the bench's own thread, building the parties before their loops start
            continue
        out["us_per_sample"].setdefault(party, {})[phase] = seconds / samples * 1e6
        out["calls_per_batch"].setdefault(party, {})[phase] = ledger.calls[(thread, phase)] / batches
    return out


def table(phases: dict[str, Any] | None) -> list[str]:
    """The report's lines: one row per phase, µs per sample of the worker's and the trainer's loop."""
    if not phases or not phases.get("us_per_sample"):
        return []
    us, calls = phases["us_per_sample"], phases["calls_per_batch"]
    names = list(dict.fromkeys(phase for _, _, phase in PHASES))
    lines = ["| phase of the loop (own CPU, less the phases it calls) | worker µs/sample | trainer µs/sample | "
             f"calls per {BATCH_SIZE} samples (worker / trainer) |", "|---|---:|---:|---:|"]
    for name in names:
        w, t = us.get("worker", {}).get(name), us.get("trainer", {}).get(name)
        if w is None and t is None:
            continue
        per_batch = [calls.get(p, {}).get(name) for p in ("worker", "trainer")]
        shown = " / ".join(_f(c, "{:.2f}") for c in per_batch) if any(c and c >= 0.01 for c in per_batch) else ""
        lines.append(f"| {name} | {_f(w)} | {_f(t)} | {shown} |")
    totals = {p: sum(us.get(p, {}).values()) for p in ("worker", "trainer")}
    window = phases.get("window_us_per_sample") or {}
    lines.append(f"| **the whole loop, wrapped (whole run)** | **{_f(totals['worker'])}** | "
                 f"**{_f(totals['trainer'])}** | |")
    lines.append(f"| the same run's 20%-80% window, as `loopcost` reads it | {_f(window.get('worker'))} | "
                 f"{_f(window.get('trainer'))} | |")
    return lines


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "" if x is None else fmt.format(x)
