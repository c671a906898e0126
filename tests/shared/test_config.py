"""Job configuration: one file, env and flags on top, and clear refusals."""
from __future__ import annotations

from pathlib import Path

import pytest

from splitmq.shared import config
from splitmq.shared.errors import ConfigError


def test_file_then_environment_then_flags_override_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[job]\njob_id = "fromfile"\nlr = 0.1\nepochs = 3\ncuts = [2, 4]\n')
    cfg = config.load(path, {"epochs": 7}, environ={"SPLITMQ_LR": "0.2", "SPLITMQ_BATCH_SIZE": "32"})
    assert (cfg.job_id, cfg.lr, cfg.epochs, cfg.batch_size, cfg.cuts) == ("fromfile", 0.2, 7, 32, (2, 4))


@pytest.mark.parametrize("text, words", [
    ("nonsense = 1\n", "unknown keys"),
    ("epochs = 'many'\n", "epochs: expected int"),
    ("batch_size = 0\n", "batch_size must be >= 1"),
    ("model = 'resnet'\n", "unknown model"),
    ("staleness = 'magic'\n", "staleness must be one of"),
    ("job_id = 'a.b'\n", "must be 1-64"),
    ("momentum = 0.9\nmax_in_flight = 4\n", "momentum > 0 needs max_in_flight = 1"),
    ("[job\n", "cannot read config"),
])
def test_bad_configuration_is_refused_with_a_message_naming_the_problem(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        config.load(path, environ={})


def test_peers_with_different_agreed_fields_are_told_which_differ() -> None:
    mine = config.JobConfig().agreed()
    theirs = config.JobConfig(lr=0.05, model="cnn").agreed()
    diffs = config.differences(mine, theirs)
    assert any(d.startswith("lr:") for d in diffs) and any(d.startswith("model:") for d in diffs)
    assert any(d.startswith("cut_shapes:") for d in diffs)
    assert config.differences(mine, config.JobConfig(max_in_flight=4).agreed()) == []  # a per-party choice
