"""``splitmq.bench.device_check``, the GPU check, kept working on a machine without a GPU: with
``--device cpu`` it runs end to end on the real broker, and it refuses a CUDA device this machine lacks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitmq.bench import device_check


def test_the_device_check_runs_end_to_end_on_the_cpu_and_finds_each_batch_applied_once(
        amqp_url: str, tmp_path: Path) -> None:
    # Given the check on the CPU, its crash run killed twice
    out = tmp_path / "check.json"
    # When it runs against the real broker
    code = device_check.main(["--device", "cpu", "--kills", "2", "--seed", "3", "--amqp-url", amqp_url,
                              "--workdir", str(tmp_path / "runs"), "--out", str(out)])
    # Then it passes, and every run applied each batch once and ended on the same weights
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["run"] for r in rows] == ["cpu", "both on cpu, again", "both on cpu, killed", "both on cpu, K=4, killed"]
    assert all(r["exactly_once"] for r in rows)
    assert [r["same_weights_as_uninterrupted"] for r in rows] == [True, True, True, None]  # K=4: order-dependent
    assert rows[2]["kills"] == rows[3]["kills"] == 2 and rows[1]["largest_loss_gap_to_cpu"] == 0.0
    assert 0.5 < rows[0]["accuracy"] <= 1


def test_the_check_fails_where_a_run_on_the_device_ends_on_other_weights() -> None:
    row = {"run": "both on cuda, killed", "trainer": "cuda", "worker": "cuda", "exactly_once": True,
           "same_weights_as_uninterrupted": True}
    unordered = {**row, "run": "both on cuda, K=4, killed", "same_weights_as_uninterrupted": None}
    mixed = {**row, "run": "trainer on cuda", "worker": "cpu", "same_weights_as_uninterrupted": False}
    assert device_check.passed({"device": "cuda", "rows": [row, mixed, unordered]})
    assert not device_check.passed({"device": "cuda", "rows": [{**row, "same_weights_as_uninterrupted": False}]})
    assert not device_check.passed({"device": "cuda", "rows": [{**row, "exactly_once": False}]})


def test_the_device_check_refuses_a_cuda_device_the_machine_lacks(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_check.main(["--device", "cuda"]) == 2
    assert "use --device cpu" in capsys.readouterr().out
