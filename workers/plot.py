"""``splitmq plot``: training curves (loss and test accuracy over time, per party) as a PNG.

Every party appends its progress to ``<run dir>/history-<party>.jsonl`` (workers/runtime.py
``History``): one JSON object a line with ``time``, ``party``, ``loss`` and, after an
evaluation, ``test_accuracy``. This reads those files after (or during) a run, so it needs no
Prometheus. A line being written while we read, or one damaged by a crash, is skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Curve:
    """One party's points: seconds since the run's first record, and the value."""

    party: str
    loss: list[tuple[float, float]] = field(default_factory=list)
    accuracy: list[tuple[float, float]] = field(default_factory=list)


def read_history(run_dir: Path, run: str | None = None) -> list[Curve]:
    """Curves of one run in ``run_dir`` (``run``'s stamp, else each party's latest), times relative
    to the earliest record.

    Raises:
        FileNotFoundError: ``run_dir`` holds no history file.
    """
    files = latest_run(sorted(run_dir.glob("history-*.jsonl")), run)
    if not files:
        raise FileNotFoundError(f"no history-*.jsonl in {run_dir}" + (f" for run {run}" if run else ""))
    records: dict[str, list[dict[str, float]]] = {}
    skipped = 0
    for path in files:
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                t = float(rec["time"])
            except (ValueError, KeyError, TypeError):
                skipped += 1
                continue
            party = str(rec.get("party") or path.stem.removeprefix("history-"))
            records.setdefault(party, []).append({"time": t, **{k: rec[k] for k in ("loss", "test_accuracy")
                                                                if _number(rec.get(k))}})
    if skipped:
        log.warning("skipped %d unreadable line(s) in %s", skipped, run_dir)
    start = min((r["time"] for recs in records.values() for r in recs), default=0.0)
    curves = []
    for party in sorted(records):
        recs = sorted(records[party], key=lambda r: r["time"])
        curves.append(Curve(party=party,
                            loss=[(r["time"] - start, r["loss"]) for r in recs if r.get("loss") is not None],
                            accuracy=[(r["time"] - start, r["test_accuracy"]) for r in recs
                                      if r.get("test_accuracy") is not None]))
    return curves


_STAMPED = re.compile(r"^history-(?P<party>.+)-(?P<stamp>\d{8}T\d{6})$")


def latest_run(files: list[Path], run: str | None = None) -> list[Path]:
    """Each party's history of one run: the given run's stamp, else each party's latest.

    A party writes ``history-<party>-<start stamp>.jsonl``, one file per run, so re-runs under one
    job id never mix into one curve.
    """
    chosen: dict[str, tuple[str, Path]] = {}
    for path in files:
        match = _STAMPED.match(path.stem)
        party, stamp = (match["party"], match["stamp"]) if match else (path.stem.removeprefix("history-"), "")
        if run is not None and stamp != run:
            continue
        if party not in chosen or stamp > chosen[party][0]:
            chosen[party] = (stamp, path)
    return [path for _, path in sorted(chosen.values(), key=lambda sp: sp[1].name)]


def _number(value: object) -> bool:
    """A plottable value (NaN and infinities would hide every other point on the axis)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot(curves: list[Curve], out: Path, *, title: str = "") -> None:
    """Write a PNG with loss (top) and test accuracy (bottom) against time, one line per party."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for curve in curves:
        if curve.loss:
            xs, ys = zip(*curve.loss)
            # Markers when points are few, so a short run (or a single point) still shows.
            ax_loss.plot(xs, ys, label=curve.party, linewidth=1, marker="." if len(xs) < 50 else None)
        if curve.accuracy:
            xs, ys = zip(*curve.accuracy)
            ax_acc.plot(xs, ys, marker="o", label=curve.party)
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title(title or "splitmq training")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_xlabel("seconds since the run started")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    try:
        curves = read_history(run_dir, args.run)
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 1
    out = Path(args.out)
    plot(curves, out, title=args.title or f"splitmq {run_dir.name}")
    log.info("wrote %s (%s)", out, ", ".join(f"{c.party}: {len(c.loss)} points" for c in curves))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("plot", help="PNG of loss and test accuracy over time per party, from a run's history")
    p.add_argument("--run-dir", required=True, help="the run's directory (runs/<job>), holding history-*.jsonl")
    p.add_argument("--out", default="curves.png", help="PNG to write (default curves.png)")
    p.add_argument("--title", help="plot title (default: the run directory's name)")
    p.add_argument("--run", help="which run to draw, by the stamp in its files' names (default: the latest)")
    p.set_defaults(func=main)
