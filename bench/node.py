"""A RabbitMQ node of the benchmark's own, so that its CPU is ours alone.

The shared broker on 5672 serves everyone's tests; the CPU its ``beam.smp`` spends during a
benchmark would include theirs. ``own_node()`` starts a second node with the project's own
script (``deploy/broker.sh``, as the broker-restart tests do, on other ports), yields its URL
and ``beam.smp`` pid, and stops it at the end if it started it.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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
def own_node() -> Iterator[Node]:
    """Start the benchmark's node (unless it already runs), yield it, stop it if we started it.

    Raises:
        subprocess.CalledProcessError: the node did not start (the script's message is on stderr).
    """
    running = pid() is not None and _answers()
    if not running:
        _run("start")
    try:
        yield Node(f"amqp://guest:guest@localhost:{NODE['AMQP_PORT']}/%2F", pid())
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
    as_root = [] if os.geteuid() == 0 else ["sudo", "-n"]  # rabbitmqctl needs the node's cookie: root's or rabbitmq's
    done = subprocess.run([*as_root, "rabbitmqctl", "-n", f"{NODE['NODE']}@localhost", "eval",
                           "ra_log_wal:force_roll_over(ra_log_wal)."], capture_output=True, timeout=120)
    return done.returncode == 0


def on_fresh_wal(n: Node, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()`` on a fresh write-ahead log (no benchmark row writes 512 MiB), with the
    rollovers that still fell inside it (``wal_rollovers``; None where the log is not ours to see)."""
    fresh = roll_wal(n)
    before = wal_number() if fresh else None
    row = measure()
    after = wal_number() if fresh else None
    row["wal_rollovers"] = after - before if before is not None and after is not None else None
    return row


def _answers() -> bool:
    import socket
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", int(NODE["AMQP_PORT"]))) == 0
