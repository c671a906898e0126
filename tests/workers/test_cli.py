"""The command line as a new user meets it: one-line errors that say what to change, documented
exit codes, global options anywhere, and an interrupted run that says so."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from splitmq import __version__
from tests.helpers import Party, wait_for

BROKER = "amqp://guest:guest@localhost:5672/%2F"


def splitmq(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitmq", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, code, words", [
    (["worker", "--config", "/nonexistent/job.toml"], 3, "config file /nonexistent/job.toml does not exist"),
    (["worker", "--epochs", "0"], 3, "epochs must be >= 1"),
    (["worker", "--client-index", "4", "--num-clients", "2"], 3, "--client-index 4 is out of range"),
    (["worker", "--client-id", "client-1", "--client-index", "0"], 3, "client-1 is owner 1, but --client-index is 0"),
    (["worker", "--data", "mnist"], 3, "needs --data-dir"),
    (["worker", "--amqp-url", "localhost:5672"], 3, "must start with amqp:// or amqps://"),
    (["worker", "--optimizer", "Adamm"], 3, "is not a torch.optim optimizer"),
    (["worker", "--stages", "@head"], 3, "@head must be the last of stages, after at least one stage"),
    (["server", "--stage", "nowhere"], 3, "is not a stage this server can hold"),
    (["worker", "--amqp-url", "amqp://no-such-host.invalid:5672"], 69, "cannot resolve the broker host"),
    (["worker", "--bogus"], 2, "unrecognized arguments: --bogus"),
])
def test_a_mistake_gets_one_line_that_says_what_to_change_and_a_documented_exit_code(
        tmp_path: Path, args: list[str], code: int, words: str) -> None:
    out = splitmq(*args, "--broker-timeout", "20") if args[0] in ("worker", "server") and "--bogus" not in args \
        else splitmq(*args)
    text = out.stderr + out.stdout
    assert out.returncode == code, text
    assert words in text and "Traceback" not in text, text


@pytest.mark.parametrize("text, words", [
    ("[job\nepochs = 1\n", "cannot read config"),
    ("epochs = 1\nnonsense = 2\n", "unknown keys"),
    ("epochs = 'many'\n", "epochs: expected int"),
])
def test_a_bad_job_file_is_named_in_one_line(tmp_path: Path, text: str, words: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(text)
    out = splitmq("worker", "--config", str(job))
    assert out.returncode == 3 and words in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_an_empty_mnist_directory_is_named_without_suggesting_a_download(tmp_path: Path) -> None:
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    out = splitmq("worker", "--data", "mnist", "--data-dir", str(tmp_path))
    assert out.returncode == 3 and "nothing is downloaded" in out.stderr and "download=True" not in out.stderr


def test_version_and_global_options_before_or_after_the_command() -> None:
    assert splitmq("--version").stdout.strip() == f"splitmq {__version__}"
    assert splitmq("job", "--help", "--log-level", "DEBUG").returncode == 0
    assert splitmq("--log-level", "DEBUG", "job", "--help").returncode == 0
    bad = splitmq("--log-level", "LOUD", "job", "delete", "x")
    assert bad.returncode == 2 and "--log-level" in bad.stderr


def test_an_interrupted_run_exits_130_and_never_says_done(amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given an owner waiting for a trainer that is not there
    owner = Party(tmp_path, "owner", "worker", ["--job-id", job_id, "--amqp-url", amqp_url]).start()
    wait_for(lambda: "serving job" in owner.log.read_text(), "the owner to connect")
    # When it is interrupted (Ctrl-C)
    owner.signal(signal.SIGINT)
    # Then it exits 130, saying it was interrupted, and its summary says so too
    assert owner.wait() == 130
    assert owner.summary()["exit"] == "interrupted" and "exit done" not in owner.log.read_text()
