"""Job configuration: one file, env and flags on top, and clear refusals."""
from __future__ import annotations

from pathlib import Path

import pytest

from splitmq.shared import config
from splitmq.shared.errors import ConfigError


def test_file_then_environment_then_flags_override_the_defaults(tmp_path: Path) -> None:
    # Given a file, an environment variable and a flag that each set something
    path = tmp_path / "job.toml"
    path.write_text('[job]\njob_id = "fromfile"\nlr = 0.1\nepochs = 3\ncuts = ["relu1", "relu2"]\n'
                    'stages = ["bob", "claire"]\n')
    # When the config is loaded
    cfg = config.load(path, {"epochs": 7}, environ={"SPLITMQ_LR": "0.2", "SPLITMQ_BATCH_SIZE": "32"})
    # Then the later source wins for each key
    assert (cfg.job_id, cfg.lr, cfg.epochs, cfg.batch_size) == ("fromfile", 0.2, 7, 32)
    assert cfg.cuts == ("relu1", "relu2") and cfg.stages == ("bob", "claire")


def test_an_optimizer_table_gives_the_name_the_peak_rate_and_its_other_arguments(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('optimizer = {name = "AdamW", lr = 0.001, weight_decay = 0.01}\nloss = "bce_with_logits"\n'
                    'task = "binary"\n')
    cfg = config.load(path, environ={})
    assert (cfg.optimizer, cfg.lr, dict(cfg.optimizer_args)) == ("AdamW", 0.001, {"weight_decay": 0.01})
    assert cfg.optimizer_spec.describe()["name"] == "AdamW"
    assert cfg.task is config.Task.BINARY


@pytest.mark.parametrize("text, words", [
    ("nonsense = 1\n", "unknown keys"),
    ("epochs = 'many'\n", "epochs: expected int"),
    ("batch_size = 0\n", "batch_size must be >= 1"),
    ("staleness = 'magic'\n", "staleness: expected Staleness"),
    ("job_id = 'a.b'\n", "must be 1-64"),
    ("optimizer = 'Magic'\n", "is not a torch.optim optimizer"),
    ("optimizer = {name = 'SGD', momentum = 0.9}\nmax_in_flight = 4\n", "momentum > 0 needs max_in_flight = 1"),
    ("stages = ['@head', 'top']\n", "must be the last of stages"),
    ("cuts = ['a', 'b']\n", "one cut per stage"),
    ("compress_activations = 'topk'\ntopk_fraction = 0\n", "topk_fraction must be in"),
    ("topk_fraction = 1.5\n", "topk_fraction must be in"),
    ("[job\n", "cannot read config"),
])
def test_bad_configuration_is_refused_with_a_message_naming_the_problem(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        config.load(path, environ={})


def test_a_missing_config_file_is_named() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load("/nonexistent/job.toml", environ={})


def test_peers_with_different_agreed_fields_are_told_which_differ() -> None:
    mine = config.JobConfig().agreed()
    theirs = config.JobConfig(lr=0.05, model="cnn").agreed()
    diffs = config.differences(mine, theirs)
    assert any(d.startswith("lr:") for d in diffs) and any(d.startswith("model:") for d in diffs)
    # per-party choices are not part of what must agree
    assert config.differences(mine, config.JobConfig(max_in_flight=4, data="synthetic").agreed()) == []


def test_every_field_is_a_flag_a_toml_key_and_an_environment_variable() -> None:
    import argparse

    from splitmq.workers import options

    p = argparse.ArgumentParser()
    options.add_job_options(p)
    flags = {a.dest for a in p._actions}
    assert set(config.FIELDS) <= flags
    args = p.parse_args(["--optimizer-args", "weight_decay=0.01,amsgrad=true", "--stages", "mid,@head",
                         "--cuts", "relu1,relu2"])
    cfg = options.job_config(args)
    assert dict(cfg.optimizer_args) == {"weight_decay": 0.01, "amsgrad": True}
    assert cfg.u_shaped and cfg.segment_count == 3
