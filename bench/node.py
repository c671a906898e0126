"""A RabbitMQ node of the benchmark's own, so that its CPU is ours alone.

The shared broker on 5672 serves everyone's tests; the CPU its ``beam.smp`` spends during a
benchmark would include theirs. ``own_node()`` starts a second node with the project's own
script (``deploy/broker.sh``, as the broker-restart tests do, on other ports), yields its URL
and ``beam.smp`` pid, and stops it at the end if it started it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from splitmq.bench import cputime

log = logging.getLogger(__name__)

#: ``settle``: the node is quiet when it uses less than this share of a core over SETTLE_WINDOW_S.
QUIET_SHARE = 0.05
SETTLE_WINDOW_S = 1.0
SETTLE_DEADLINE_S = 60.0
#: What runs a node's own tools (rabbitmqctl needs the node's Erlang cookie, which only root and the
#: rabbitmq user read) and signals its VM: nothing as root, sudo for a user with sudo (the quick start's).
AS_ROOT: list[str] = [] if os.geteuid() == 0 else ["sudo", "-n"]
#: The benchmark node's name and ports (the tests use 5690 and 5831-5833).
NODE = {"NODE": "bench", "AMQP_PORT": "5750", "MGMT_PORT": "15750", "PROM_PORT": "15752"}
STATE_ROOT = Path(os.environ.get("STATE_ROOT", "/var/lib/splitmq"))
START_TIMEOUT_S = 300


@dataclass(frozen=True)
class Node:
    url: str
    pid: int | None   # beam.smp's pid (None: not known, e.g. the shared broker)


def script() -> Path:
    """deploy/broker.sh: in a checkout next to bench/, in a wheel under splitmq/deploy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "deploy" / "broker.sh", here.parent / "splitmq" / "deploy" / "broker.sh"):
        if candidate.exists():
            return candidate
    import splitmq.deploy  # package data only in a wheel
    return Path(splitmq.deploy.__path__[0]) / "broker.sh"


def _run(action: str) -> None:
    subprocess.run([str(script()), action], env={**os.environ, **NODE}, check=True, timeout=START_TIMEOUT_S,
                   stdout=subprocess.DEVNULL)


def pid() -> int | None:
    path = STATE_ROOT / f"broker-{NODE['NODE']}" / "rabbitmq.pid"
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().split()[0])
    return None


@contextlib.contextmanager
def own_node(warm_up: Callable[[Node], object] | None = None) -> Iterator[Node]:
    """Start the benchmark's node (unless it already runs), yield it, stop it if we started it.

    A node this starts first runs ``warm_up`` (unmeasured): on 2026-11-24 the first job on a
    freshly started node cost its broker 43-47 µs per sample against 27-28 for the same job
    right after, on a node quiet before each (``settle``), in three runs of ``bench coalesce``.

    Raises:
        subprocess.CalledProcessError: the node did not start (the script's message is on stderr).
    """
    running = pid() is not None and _answers()
    if not running:
        _run("start")
    try:
        n = Node(f"amqp://guest:guest@localhost:{NODE['AMQP_PORT']}/%2F", pid())
        if not running and warm_up is not None:
            log.info("warming up broker node %s, just started: one job, not measured", NODE["NODE"])
            warm_up(n)
        yield n
    finally:
        if not running:
            _run("stop")


def _wal_dir() -> Path:
    name = f"{NODE['NODE']}@localhost"
    return STATE_ROOT / f"broker-{NODE['NODE']}" / "mnesia" / name / "quorum" / name


def wal_number() -> int | None:
    """The number of the benchmark node's current quorum-queue write-ahead log file (None: not ours,
    or not found). It grows by one at each rollover (every 512 MiB written, RabbitMQ's default)."""
    numbers = [int(p.stem) for p in _wal_dir().glob("*.wal") if p.stem.isdigit()]
    return max(numbers) if numbers else None


def roll_wal(n: Node) -> bool:
    """Start a fresh write-ahead log on the benchmark's node, so that a row that writes less than
    512 MiB pays no rollover (a rollover's burst of the broker's CPU nearly doubles the figure of
    a row it falls in: docs/benchmarks.md). False where it could not (not our node)."""
    if n.pid is None:
        return False
    done = subprocess.run([*AS_ROOT, "rabbitmqctl", "-n", f"{NODE['NODE']}@localhost", "eval",
                           "ra_log_wal:force_roll_over(ra_log_wal)."], capture_output=True, timeout=120)
    return done.returncode == 0


def settle(n: Node, *, quiet: float = QUIET_SHARE, deadline_s: float = SETTLE_DEADLINE_S) -> float | None:
    """Wait until the node is quiet: under ``quiet`` of a core for ``SETTLE_WINDOW_S``. What it still
    does for the last row (deleting its queues, moving a rolled-over log to segment files) must
    not count in the next. Returns the seconds it took, or None when it was still busy at
    ``deadline_s`` (logged; the row then runs anyway, and the report says so) or is not ours to watch.
    """
    if n.pid is None:
        return None
    path, since = f"/proc/{n.pid}/stat", time.monotonic()
    log.info("waiting up to %.0fs for broker node %s (pid %d) to be quiet (under %.0f%% of a core for %.1fs)",
             deadline_s, NODE["NODE"], n.pid, quiet * 100, SETTLE_WINDOW_S)
    while time.monotonic() - since < deadline_s:
        before, started = cputime.stat_ticks(path), time.monotonic()
        time.sleep(SETTLE_WINDOW_S)
        used = (cputime.stat_ticks(path) - before) * cputime.TICK_S / (time.monotonic() - started)
        if used < quiet:
            log.info("broker node %s quiet after %.1fs", NODE["NODE"], time.monotonic() - since)
            return time.monotonic() - since
    log.warning("broker node %s still used over %.0f%% of a core after %.0fs; measuring anyway",
                NODE["NODE"], quiet * 100, deadline_s)
    return None


def on_fresh_wal(n: Node, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()`` on a fresh write-ahead log (no benchmark row writes 512 MiB) and a quiet node
    (``settle``), with the rollovers that still fell inside it (``wal_rollovers``; None where the
    log is not ours to see) and how long the node took to settle (``settled_s``; None: it did not)."""
    fresh = roll_wal(n)
    settled = settle(n)
    before = wal_number() if fresh else None
    row = measure()
    row["settled_s"] = settled
    after = wal_number() if fresh else None
    row["wal_rollovers"] = after - before if before is not None and after is not None else None
    return row


def _answers() -> bool:
    import socket
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", int(NODE["AMQP_PORT"]))) == 0


def rows_note(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """What the broker carried into each row (``on_fresh_wal``'s ``settled_s`` and ``wal_rollovers``), as
    a paragraph of a report; empty where the node was not ours to watch."""
    if all(row.get("wal_rollovers") is None and row.get("settled_s") is None for _, row in rows):
        return []
    settled = [row["settled_s"] for _, row in rows if row.get("settled_s") is not None]
    busy = [name for name, row in rows if row.get("settled_s") is None]
    waited = (f"after the node had been quiet for {SETTLE_WINDOW_S:.0f} s (under {QUIET_SHARE:.0%} of a core; "
              f"waited {min(settled):.1f}-{max(settled):.1f} s)" if settled else "")
    return ["Each broker row began on a fresh quorum-queue write-ahead log (`ra_log_wal:force_roll_over`; a "
            "rollover, every 512 MiB written, nearly doubles the broker's figure of a row it falls in)"
            + (f" and {waited}" if waited else "")
            + (f"; not quiet within {SETTLE_DEADLINE_S:.0f} s, measured anyway: {', '.join(busy)}" if busy else "")
            + "; rollovers that still fell inside a row: "
            + ", ".join(f"{name} {_count(row.get('wal_rollovers'))}" for name, row in rows) + ".", ""]


def _count(n: int | None) -> str:
    return "n/a" if n is None else str(n)
