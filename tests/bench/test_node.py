"""``bench.node``: a benchmark row starts only once the broker node is quiet (``settle``), and says when it was
not; a node the benchmark starts runs one unmeasured job first (``own_node``'s warm-up).

Real processes stand in for the node (a busy loop, then sleep): ``settle`` reads their CPU from
``/proc`` as it reads ``beam.smp``'s. The tests wait on what the process did (a file it writes when
it goes quiet), never on a duration.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from splitmq.bench import node

_BUSY_THEN_QUIET = """
import pathlib, sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
pathlib.Path(sys.argv[2]).write_text("quiet")
time.sleep(600)
"""


@pytest.fixture
def busy_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A process that spins for 3 s, then writes its marker file and sleeps."""
    marker = tmp_path / "quiet"
    proc = subprocess.Popen([sys.executable, "-c", _BUSY_THEN_QUIET, "3", str(marker)])
    try:
        yield proc, marker
    finally:
        proc.kill()
        proc.wait(30)


def test_settle_returns_only_once_the_node_has_gone_quiet(busy_process: tuple[subprocess.Popen[bytes], Path]) -> None:
    # Given a "node" that spins before going quiet
    proc, marker = busy_process

    # When the bench waits for it to settle
    settled = node.settle(node.Node("amqp://unused", proc.pid), deadline_s=120)

    # Then it came back only after the process went quiet, and says how long that took
    assert settled is not None and marker.exists()


def test_settle_gives_up_at_its_deadline_and_says_so(busy_process: tuple[subprocess.Popen[bytes], Path],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # Given a "node" still spinning when the deadline comes
    proc, marker = busy_process
    caplog.set_level(logging.INFO, logger="splitmq.bench.node")

    # When the bench waits less than the spin lasts
    settled = node.settle(node.Node("amqp://unused", proc.pid), deadline_s=1.0)

    # Then it measures anyway (None), having logged what it waited for and that it gave up
    assert settled is None and not marker.exists()
    assert "to be quiet" in caplog.text and "measuring anyway" in caplog.text


def test_a_node_not_ours_to_watch_is_not_waited_for() -> None:
    assert node.settle(node.Node("amqp://unused", None)) is None


def test_the_report_names_the_rows_whose_node_was_busy_and_each_rows_rollovers() -> None:
    rows = [("coalesce 1 run 1", {"settled_s": 1.2, "wal_rollovers": 0}),
            ("coalesce 4 run 1", {"settled_s": None, "wal_rollovers": 1})]

    note = " ".join(node.rows_note(rows))

    assert "waited 1.2-1.2 s" in note and "measured anyway: coalesce 4 run 1" in note
    assert "coalesce 1 run 1 0, coalesce 4 run 1 1" in note
    assert node.rows_note([("ceiling", {})]) == []


@pytest.mark.parametrize("already_running", [False, True])
def test_only_a_node_the_bench_starts_is_warmed_up_first(monkeypatch: pytest.MonkeyPatch,
                                                          already_running: bool) -> None:
    # Given the node's script stubbed out (starting and stopping it is deploy/broker.sh's, tested elsewhere)
    actions: list[str] = []
    monkeypatch.setattr(node, "_run", actions.append)
    monkeypatch.setattr(node, "_answers", lambda: already_running)
    monkeypatch.setattr(node, "pid", lambda: 4242 if already_running or actions else None)
    warmed: list[node.Node] = []

    # When a benchmark uses the node
    with node.own_node(warmed.append) as n:
        used_after = list(warmed)

    # Then the warm-up ran once, before the benchmark got the node, only if the bench started it
    assert used_after == ([] if already_running else [n])
    assert actions == ([] if already_running else ["start", "stop"])
