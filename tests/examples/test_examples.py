"""Every example in examples/ trains over the real broker (its parties as processes) and matches
the same model trained locally: synchronous ones step by step, asynchronous ones on the metric."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import ROOT


def run_example(name: str, tmp: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--json", "--workdir", str(tmp / name),
                          "--job-id", f"ex{tmp.name[-8:]}".replace("_", ""), *args],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_vertical_hospitals_train_on_their_shared_patients_exactly_as_locally(amqp_url: str, tmp_path: Path) -> None:
    # Given two hospitals with partly overlapping patients and a lab, When they train over the broker
    result = run_example("vertical_hospitals", tmp_path, "--epochs", "4")
    # Then every step's loss and the AUC equal the same model's trained locally on the same patients
    assert result["largest per-step loss difference"] == 0.0, result
    assert result["split"] == result["local"] and result["split"] > 0.9


def test_edge_sensors_with_two_devices_in_flight_and_averaging_reach_local_accuracy(
        amqp_url: str, tmp_path: Path) -> None:
    result = run_example("edge_sensors", tmp_path, "--epochs", "15")
    assert abs(result["split"] - result["local"]) <= 0.01, result


def test_an_image_folder_with_a_conv_cut_and_adam_matches_local_training_step_by_step(
        amqp_url: str, tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "examples" / "your_images.py"), "--make-digits",
                    str(tmp_path / "digits")], check=True, timeout=300, cwd=ROOT, capture_output=True)
    result = run_example("your_images", tmp_path, "--epochs", "2", "--images", str(tmp_path / "digits"))
    assert result["largest per-step loss difference"] == 0.0, result
    assert result["split"] == result["local"] and result["split"] > 0.5


def test_regression_with_mse_matches_local_training_step_by_step(amqp_url: str, tmp_path: Path) -> None:
    result = run_example("regression_diabetes", tmp_path, "--epochs", "10")
    assert result["largest per-step loss difference"] == 0.0, result
    assert abs(result["split"] - result["local"]) <= 1e-5 and result["metric"] == "MAE"


def test_u_shaped_with_the_owners_own_loss_matches_local_training_step_by_step(amqp_url: str, tmp_path: Path) -> None:
    result = run_example("u_shaped_owner_head", tmp_path, "--epochs", "1")
    assert result["largest per-step loss difference"] == 0.0, result
    assert result["split"] == result["local"]
