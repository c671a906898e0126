"""The edge worker's install script, systemd unit and environment file."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
from pathlib import Path

from tests.deploy.support import REPO, run

EDGE = REPO / "deploy" / "edge"
UNIT = "splitmq-worker@.service"


def install_into(root: Path, *clients: str) -> None:
    args = [a for c in clients for a in ("--client", c)]
    done = run(["bash", str(EDGE / "install.sh"), "--no-python", *args], env={"ROOT": str(root)})
    assert done.returncode == 0, done.stdout + done.stderr


def env_file(path: Path) -> dict[str, str]:
    """systemd EnvironmentFile syntax, as far as our file uses it (KEY=value, # comments)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {k: v for k, v in pairs}


def exec_start_argv(unit: str, client: str, env: dict[str, str]) -> list[str]:
    """The worker's argv as systemd builds it: %i and %S specifiers, ${VAR} one word, $VAR split."""
    body = re.search(r"^ExecStart=(.*?)(?<!\\)$", unit, re.M | re.S)
    assert body
    line = body.group(1).replace("\\\n", " ").replace("%i", client).replace("%S", "/var/lib")
    words = []
    for word in shlex.split(line):
        if word.startswith("${"):
            words.append(env[word[2:-1]])
        elif word.startswith("$"):
            words += env[word[1:]].split()
        else:
            words.append(word)
    return words


def test_install_script_puts_the_unit_and_a_private_env_file_in_place(tmp_path: Path) -> None:
    # Given an empty root directory
    # When install.sh installs two clients into it (without the Python part)
    install_into(tmp_path, "client-3", "pi-kitchen")
    # Then the unit template is installed, and each client has an env file only its group can read
    assert (tmp_path / "etc/systemd/system" / UNIT).read_text() == (EDGE / UNIT).read_text()
    for client in ("client-3", "pi-kitchen"):
        env = tmp_path / "etc/splitmq" / f"{client}.env"
        assert stat.S_IMODE(env.stat().st_mode) == 0o640
        assert f"amqp://{client}:" in env_file(env)["AMQP_URL"]
    assert (tmp_path / "opt/splitmq/docs/edge.md").exists()


def test_install_script_keeps_an_edited_env_file(tmp_path: Path) -> None:
    # Given an installed client whose env file was edited
    install_into(tmp_path, "client-3")
    env = tmp_path / "etc/splitmq/client-3.env"
    env.write_text("AMQP_URL=amqp://client-3:secret@broker:5672/%2F\n")
    # When install.sh runs again
    install_into(tmp_path, "client-3")
    # Then the edit is still there
    assert "secret" in env.read_text()


def test_install_script_refuses_a_client_id_that_cannot_be_a_routing_key(tmp_path: Path) -> None:
    # When install.sh is given a client id with a dot
    done = run(["bash", str(EDGE / "install.sh"), "--no-python", "--client", "client.0"], env={"ROOT": str(tmp_path)})
    # Then it refuses it before installing anything
    assert done.returncode == 2 and "client id" in done.stderr
    assert not (tmp_path / "etc").exists()


def test_the_unit_passes_systemd_analyze_verify(systemd_analyze: str, tmp_path: Path) -> None:
    # Given a root with the unit installed by install.sh, systemd's own units, and an executable
    # where the installer's virtualenv puts `splitmq` (verify checks that the command exists)
    install_into(tmp_path, "client-0")
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr/lib/systemd/system", symlinks=True)
    exe = tmp_path / "opt/splitmq/venv/bin/splitmq"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    # When systemd-analyze verifies an instance of the template
    done = run([systemd_analyze, "verify", f"--root={tmp_path}", "splitmq-worker@client-0.service"])
    # Then it passes without a single warning (unknown keys and bad values only warn)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


def test_the_unit_command_line_is_one_the_worker_accepts() -> None:
    # Given the unit's ExecStart with the example env file's values filled in
    env = env_file(EDGE / "worker.env.example")
    argv = exec_start_argv((EDGE / UNIT).read_text(), "client-0", env)
    assert argv[0] == "/opt/splitmq/venv/bin/splitmq"
    # When the splitmq command parses it
    from splitmq.workers.cli import build_parser

    args = build_parser(argv[1:]).parse_args(argv[1:])
    # Then it is a worker for that client, with the per-device settings from the env file
    assert args.command == "worker" and args.client_id == "client-0"
    assert args.client_index == int(env["SPLITMQ_CLIENT_INDEX"])
    assert args.metrics_port == int(env["SPLITMQ_METRICS_PORT"])
    assert args.checkpoint_dir == "/var/lib/splitmq/client-0/checkpoints"


def test_the_example_env_file_holds_a_job_the_config_loader_accepts() -> None:
    # Given the example env file as the worker's whole environment
    env = env_file(EDGE / "worker.env.example")
    from splitmq.shared import config

    # When the job config is loaded from it (as the worker does; other variables are ignored)
    cfg = config.load(None, environ=env)
    # Then the job settings are taken up
    assert cfg.job_id == env["SPLITMQ_JOB_ID"] and cfg.epochs == int(env["SPLITMQ_EPOCHS"])
    assert cfg.max_in_flight == int(env["SPLITMQ_MAX_IN_FLIGHT"])


def test_the_install_script_is_valid_bash() -> None:
    done = run(["bash", "-n", str(EDGE / "install.sh")])
    assert done.returncode == 0, done.stderr
    assert os.access(EDGE / "install.sh", os.X_OK)
