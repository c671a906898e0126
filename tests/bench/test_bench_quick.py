"""The benchmark suite's CI smoke tests: ``splitmq bench --quick`` runs every part briefly on
the real broker (the CPU-per-sample part included) and writes its files; ``splitmq bench
coalesce --quick`` writes its own section and JSON file. They assert the files' shape, never a
timing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SECTIONS = ("## Where we stand", "## 1. Throughput", "## 2. Broker ceiling", "## 3. Scale", "## 4. Bytes",
            "## 5. Codec", "## 6. Edge links", "## 7. Local training", "## 8. Profile")


def test_quick_bench_writes_a_report_and_strict_json_with_every_part(amqp_url: str, tmp_path: Path) -> None:
    # Given a broker and empty output paths
    out_md, out_json = tmp_path / "b.md", tmp_path / "b.json"
    env = {**os.environ, "AMQP_URL": amqp_url}

    # When the suite runs in quick mode
    proc = subprocess.run(
        [sys.executable, "-m", "splitmq", "--log-level", "WARNING", "bench", "--quick",
         "--out-md", str(out_md), "--out-json", str(out_json), "--work-dir", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    # Then it succeeds and both files are written and well-formed
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out_json.read_text(), parse_constant=lambda c: _refuse_constant(c))
    assert result["quick"] is True
    for part in ("machine", "local", "codec", "peer_rpc", "ceiling", "jobs", "profile", "bytes", "ratios",
                 "cpu_ratios"):
        assert part in result, part
    assert result["command"].startswith("splitmq bench --quick")
    assert {row["mode"] for row in result["ceiling"]["rows"]} == {"durable", "transient"}
    assert result["profile"]["job"]["completed"] and result["profile"]["job"]["delay_s"] > 0
    report = out_md.read_text()
    for heading in SECTIONS:
        assert heading in report, heading
    assert result["command"] in report
    assert "torch.set_num_threads(1)" in report
    # And the CPU part wrote its section and its own strict JSON, with every contender measured
    assert "## CPU per sample per party" in report and report.count("<!-- cpu:start -->") == 1
    cpu = json.loads((tmp_path / "b-cpu.json").read_text(), parse_constant=lambda c: _refuse_constant(c))
    assert {(c["mode"], c["in_flight"]) for c in cpu["ceiling"]} == {("durable", 1), ("durable", 4), ("transient", 4)}
    assert [s["in_flight"] for s in cpu["splitmq"]] == [4]
    assert {"local", "bottom", "bottom_stash", "top", "validation"} <= set(cpu["references"])
    assert [(x["in_flight"], sorted(x["us_per_sample"] or {})) for x in cpu["loops"]] == [(4, ["trainer", "worker"])]
    assert sorted(cpu["loop_phases"]["us_per_sample"]) == ["trainer", "worker"] and "phase by phase" in report


def test_quick_coalesce_bench_writes_its_own_section_and_json_and_keeps_the_rest_of_the_page(
        amqp_url: str, tmp_path: Path) -> None:
    # Given a broker and a page that already has the suite's tables
    out_md, out_json = tmp_path / "b.md", tmp_path / "b.json"
    out_md.write_text("# Benchmarks\n\nthe suite's tables\n")
    env = {**os.environ, "AMQP_URL": amqp_url}

    # When the coalescing part runs on its own in quick mode
    proc = subprocess.run(
        [sys.executable, "-m", "splitmq", "--log-level", "WARNING", "bench", "coalesce", "--quick",
         "--out-md", str(out_md), "--out-json", str(out_json)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    # Then the page keeps its tables and gains the coalescing section once, naming the command
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out_md.read_text()
    assert report.startswith("# Benchmarks\n\nthe suite's tables\n") and report.count("<!-- coalesce:start -->") == 1
    assert "## Coalescing (`splitmq bench coalesce`)" in report and "QUICK smoke mode" in report
    # And its raw results are strict JSON of its own beside --out-json, one row per setting, coalesced fewer messages
    assert not out_json.exists()
    result = json.loads((tmp_path / "b-coalesce.json").read_text(), parse_constant=lambda c: _refuse_constant(c))
    assert result["quick"] is True and result["command"].startswith("splitmq bench coalesce --quick")
    rows = {row["coalesce"]: row for row in result["rows"]}
    assert set(rows) == {1, 4} and rows[4]["messages_per_sample"] < rows[1]["messages_per_sample"]


def _refuse_constant(name: str) -> None:
    """Strict JSON has no NaN or Infinity; finding one fails the test."""
    raise AssertionError(f"non-standard JSON constant {name} in benchmarks.json")
