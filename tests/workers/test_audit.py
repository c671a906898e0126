"""``splitmq audit`` end to end on a small job: the attacks must find the leak an undefended job has,
and a NoPeek weight that collapses the model must be reported as a collapse, not as privacy."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from splitmq.shared.errors import ConfigError
from splitmq.workers import audit, cli

#: Small enough for a test: 2 epochs (the label task too), short decoders, 200 held-out targets, no shadow attacker.
SMALL = ["--epochs", "2", "--label-epochs", "2", "--decoder-steps", "300", "--targets", "200", "--no-shadow"]


def test_an_undefended_job_leaks_its_inputs_and_its_labels_to_the_audit(tmp_path: Path) -> None:
    # Given the seed MLP with no defence
    out = tmp_path / "audit"
    # When it is audited
    code = cli.main(["audit", *SMALL, "--out", str(out)])
    # Then the report is written, and reconstruction beats what the class alone gives an attacker
    assert code == 0
    report = json.loads((out / "audit.json").read_text())
    (row,) = report["runs"]
    ssim = row["ssim"]
    assert ssim["strong"] > ssim["floor_class_mean"] + 0.2 > ssim["floor_mean_image"] + 0.2
    assert ssim["weak"] > ssim["floor_class_mean"]
    assert row["metrics"]["accuracy"] > 0.6 and 0 < row["dcor"] <= 1
    # And the returned gradients give the labels away, even with no label known
    assert row["labels"]["cosine"] > 0.95 and row["labels"]["direction"] > 0.9
    assert "| job |" in (out / "audit.md").read_text()


def test_a_nopeek_weight_that_collapses_the_model_is_reported_as_a_collapse(tmp_path: Path) -> None:
    # Given a NoPeek sweep whose second weight is far too strong for the seed MLP
    out = tmp_path / "sweep"
    # When it is audited (reconstruction only)
    code = cli.main(["audit", "--nopeek", "0.5,5", "--no-labels", *SMALL, "--epochs", "3", "--out", str(out)])
    # Then the mild weight trains, the strong one is stopped by the collapse guard, and the report says why
    assert code == 0
    mild, strong = json.loads((out / "audit.json").read_text())["runs"]
    assert mild["collapsed"] == "" and mild["metrics"]["accuracy"] > 0.7
    assert "nopeek_lambda" in strong["collapsed"] and strong["epochs_done"] < 3
    assert "nopeek=5: stopped after" in (out / "audit.md").read_text()


def test_audit_variants_name_each_run_and_refuse_a_weight_that_is_not_a_number() -> None:
    # Given preset and NoPeek lists; when they are read; then each becomes a named run's overrides
    assert audit.variants("off, standard", "0.5") == [
        ("privacy=off", {"privacy": "off"}), ("privacy=standard", {"privacy": "standard"}),
        ("nopeek=0.5", {"nopeek_lambda": 0.5})]
    assert audit.variants("", "") == [("job", {})]
    with pytest.raises(ValueError, match="--nopeek"):
        audit.variants("", "lots")


def test_the_audit_command_imports_no_torch_until_it_runs() -> None:
    # Given a fresh interpreter's view of the modules; when the audit's parser is built
    import subprocess
    code = ("import sys; from splitmq.workers import cli; cli.build_parser(['audit']); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    # Then torch was not imported
    assert done.stdout.strip() == "False"


def test_label_protection_given_for_the_label_audit_is_left_out_of_a_multi_class_job_only() -> None:
    # Given label protection asked for on the default (10-class) job, and a setting that is simply wrong
    # When the job to reconstruct is built
    cfg = audit._image_job(None, {"label_protection": 4.0})
    # Then it trains without label protection (the binary twin gets it), and other refusals still stand
    assert cfg.label_protection == 0.0
    with pytest.raises(ConfigError, match="nopeek_lambda"):
        audit._image_job(None, {"nopeek_lambda": -1.0})


def test_the_standard_preset_hides_the_binary_labels_from_every_label_attack_at_a_small_cost() -> None:
    # Given the label audit's binary task (digit 0 against the rest, labels at the top) trained for
    # the audit's epochs, undefended and with the standard preset (bottleneck and Marvell label protection)
    from splitmq.shared import config
    task = {**audit.BINARY, "epochs": audit.LABEL_EPOCHS}
    off = audit.label_attacks(config.load(None, task))
    standard = audit.label_attacks(config.load(None, {**task, "privacy": "standard"}))
    # Then undefended the gradients give the labels away; with the preset no attack gets much
    # beyond chance, the no-label direction attack included, and the test AUC hardly moves
    assert off["direction"] > 0.95 and off["cosine"] > 0.95
    assert standard["direction"] <= 0.55 and standard["norm"] <= 0.55 and standard["cosine"] <= 0.55, standard
    assert standard["test_roc_auc"] >= off["test_roc_auc"] - 0.005
