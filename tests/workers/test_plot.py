"""``splitmq plot``: training curves from a run's history files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from splitmq.workers import plot
from splitmq.workers.cli import main as splitmq

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_history(run_dir: Path) -> None:
    """A two-client run as the parties record it (workers/runtime.py History)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = 1_763_780_000.0
    for party, offset in (("trainer", 0.0), ("client-0", 0.1), ("client-1", 0.2)):
        lines = []
        for seq in range(20):
            rec = {"time": t0 + offset + seq * 0.5, "party": party, "epoch": seq // 10, "seq": seq,
                   "loss": 2.3 * math.exp(-seq / 8), "samples": 64 * (seq + 1)}
            if seq % 10 == 9 and party != "trainer":
                rec["test_accuracy"] = 0.5 + seq / 50
            lines.append(json.dumps(rec))
        (run_dir / f"history-{party}.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_writes_a_png_of_the_runs_curves(tmp_path: Path) -> None:
    # Given a finished run's history files
    run_dir = tmp_path / "runs" / "mnist"
    write_history(run_dir)
    out = tmp_path / "out" / "curves.png"
    # When `splitmq plot` runs on it
    code = splitmq(["plot", "--run-dir", str(run_dir), "--out", str(out)])
    # Then it writes a PNG image of the figure's size
    assert code == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(out).shape[:2] == (700, 900)


def test_history_gives_one_curve_per_party_with_times_from_the_runs_start(tmp_path: Path) -> None:
    # Given the history files
    write_history(tmp_path)
    # When they are read
    curves = {c.party: c for c in plot.read_history(tmp_path)}
    # Then each party has its 20 losses, clients their 2 accuracies, and time starts at 0
    assert sorted(curves) == ["client-0", "client-1", "trainer"]
    assert [len(c.loss) for c in curves.values()] == [20, 20, 20]
    assert len(curves["client-0"].accuracy) == 2 and not curves["trainer"].accuracy
    assert curves["trainer"].loss[0][0] == 0.0
    assert curves["client-1"].loss[0][0] == pytest.approx(0.2)


def test_a_half_written_line_and_non_finite_values_are_left_out(tmp_path: Path) -> None:
    # Given a party's file whose last line is being written, and a NaN loss
    (tmp_path / "history-client-0.jsonl").write_text(
        '{"time": 10.0, "party": "client-0", "loss": 1.5}\n'
        '{"time": 11.0, "party": "client-0", "loss": NaN}\n'
        '{"time": 12.0, "party": "client-0", "lo')
    # When it is read
    (curve,) = plot.read_history(tmp_path)
    # Then only the complete, finite point remains
    assert curve.loss == [(0.0, 1.5)]


def test_plot_fails_clearly_on_a_directory_without_history(tmp_path: Path) -> None:
    # Given an empty directory
    # When `splitmq plot` runs on it
    code = splitmq(["plot", "--run-dir", str(tmp_path), "--out", str(tmp_path / "x.png")])
    # Then it exits 1 and writes nothing
    assert code == 1 and not (tmp_path / "x.png").exists()
