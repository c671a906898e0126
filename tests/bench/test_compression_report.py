"""``splitmq bench compression``'s section of docs/benchmarks.md: what it shows, and that it survives the suite."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from splitmq.bench import compression, sections


def row(acts: str, grads: str, nbytes: float, acc: float, cpu: float, recv: int = 65536, run: int = 1
        ) -> dict[str, Any]:
    parties = {"worker": {"total": cpu / 2, "main": cpu / 3, "pika": cpu / 8},
               "trainer": {"total": cpu / 3, "main": cpu / 4, "pika": cpu / 12}, "broker": {"total": cpu / 6}}
    return {"activations": acts, "gradients": grads, "pika_recv_bytes": recv, "run": run, "bytes_per_sample": nbytes,
            "accuracy": acc, "samples_per_second": 1000.0, "cpu_us_per_sample": cpu, "cpu_by_party": parties,
            "bytes_ratio": 5200 / nbytes, "cpu_ratio": cpu / 160, "accuracy_delta_points": (acc - 0.9) * 100}


def result() -> dict[str, Any]:
    return {"quick": False, "in_flight": 4, "epochs": 5, "machine": {"date_utc": "2026-11-22", "uptime": "up"},
            "rows": [row("none", "none", 5200, 0.9, 160), row("int8", "fp16", 1950, 0.901, 120),
                     row("none", "none", 5200, 0.9, 190, recv=4096)]}


def test_the_section_shows_each_setting_with_bytes_accuracy_and_cpu_per_party(tmp_path: Path) -> None:
    # Given a compression result and a page without the section
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nthe suite's tables\n")
    # When the section is written into the page
    compression.write(result(), "splitmq bench compression", page, tmp_path / "c.json")
    text = page.read_text()
    # Then the page keeps what it had and shows every setting's bytes, ratio, accuracy and CPU split
    assert text.startswith("# Benchmarks\n\nthe suite's tables\n") and compression.START in text
    assert "| int8 / fp16 | 1 | 1,950 | 2.67x | 0.9010 | +0.1 | 60 (40 / 15) | 40 (30 / 10) | 20 | 120 | 0.75 |" in text
    assert "none / none (pika 4 KB reads)" in text and "`splitmq bench compression`" in text


def test_regenerating_the_main_page_keeps_the_compression_section(tmp_path: Path) -> None:
    # Given a page that has the compression section
    page = tmp_path / "benchmarks.md"
    compression.write(result(), "splitmq bench compression", page, tmp_path / "c.json")
    old = page.read_text()
    # When the suite renders a fresh page and keeps the old page's section
    new = sections.keep(old, "# Benchmarks\n\nfresh tables\n")
    # Then the fresh page carries the section, once
    assert new.startswith("# Benchmarks\n\nfresh tables\n") and new.count(compression.START) == 1
    assert "| int8 / fp16 |" in new


def test_regenerating_the_page_keeps_every_marked_section_written_by_hand_or_by_another_command() -> None:
    # Given a page with two marked sections, one of them written by hand
    start, end = sections.markers("nopeek-cost")
    old = (f"# Benchmarks\n\nold tables\n\n{compression.START}\ncompressed\n{compression.END}\n\n"
           f"{start}\nmeasured by hand\n{end}\n")
    # When the suite regenerates the page
    new = sections.keep(old, "# Benchmarks\n\nnew tables\n")
    # Then the new tables replace the old ones and both sections follow, unchanged and in order
    assert "old tables" not in new and new.startswith("# Benchmarks\n\nnew tables\n")
    assert new.index("compressed") < new.index("measured by hand") and new.count(start) == 1


def test_a_settings_figure_is_the_median_of_its_passes_each_against_its_own_passs_float32(tmp_path: Path) -> None:
    # Given three passes whose float32 rows cost 160, 200 and 150 µs and int8 / int8 rows 120, 130 and 135
    rows = []
    for run, (base, int8) in enumerate([(160.0, 120.0), (200.0, 130.0), (150.0, 135.0)], start=1):
        rows += [row("none", "none", 5200, 0.9, base, run=run),
                 row("int8", "int8", 1330, 0.9 + run / 1000, int8, run=run)]
    for one in rows:  # the ratios as the run derives them
        del one["bytes_ratio"], one["cpu_ratio"], one["accuracy_delta_points"]
    compression.against_float32(rows)
    r = {**result(), "rows": rows}
    # When the section is written
    page = tmp_path / "benchmarks.md"
    compression.write(r, "splitmq bench compression", page, tmp_path / "c.json")
    text = page.read_text()
    # Then each pass's row is there, judged against its own pass's float32 (0.75, 0.65, 0.90)
    assert "| int8 / int8 | 2 | 1,330 | 3.91x | 0.9020 | +0.2 |" in text and "| 130 | 0.65 |" in text
    # And the setting's figure is the median of the three: 0.75, with its bytes, accuracy and CPU medians
    # And what it would read were its codec free: each pass's float32 with the int8 row's broker and pika
    # threads (3/8 of each row's CPU here: 60 -> 45, 75 -> 48.75, 56.25 -> 50.6), 0.91 / 0.87 / 0.96
    assert "| int8 / int8 | 3 | 3.91x | +0.2 | 130 | 0.75 / 0.65 / 0.90 | **0.75** | 0.91 |" in text
    assert "| none / none | 3 | 1.00x | +0.0 | 160 | 1.00 / 1.00 / 1.00 | **1.00** | 1.00 |" in text


def test_the_codec_free_bound_is_not_made_up_where_a_thread_was_not_measured() -> None:
    # Given a pass whose int8 row has no pika figure for the trainer
    rows = [row("none", "none", 5200, 0.9, 160), row("int8", "int8", 1330, 0.9, 120)]
    del rows[1]["cpu_by_party"]["trainer"]["pika"]
    # When the rows are judged against float32
    compression.against_float32(rows)
    # Then the float32 row bounds itself at 1 and the int8 row has no bound, rather than a guess
    assert rows[0]["cpu_ratio_codec_free"] == 1.0
    assert rows[1]["cpu_ratio_codec_free"] is None and rows[1]["cpu_ratio"] == 0.75
