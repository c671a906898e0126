"""deploy/broker.sh run by a user with sudo (the quick start's "or a user with sudo") starts the node it names.

sudo resets the environment, and the script passes its settings (node name, ports, state
directory) to RabbitMQ in environment variables: a node started with ``sudo rabbitmq-server``
came up as RabbitMQ's default node, if at all, and the script then timed out waiting for the
one it named (seen 2026-11-24). Here a user who is not root runs the script with a node name
and ports of the test's own; the node must answer there, with this repository's configuration.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Iterator

import pika
import pytest

from tests.conftest import STATE_ROOT
from tests.deploy.support import REPO, apt_install, wait_for

#: Ports clear of the shared node (5672), the restart nodes (5690, 59x0), the cluster (583x) and the bench (5750).
NODE = {"NODE": "asuser", "AMQP_PORT": "5790", "MGMT_PORT": "15790", "PROM_PORT": "15794"}
USER = "splitmq-sudoer"
SUDOERS = Path("/etc/sudoers.d/splitmq-test-sudoer")


@pytest.fixture
def sudo_user(tmp_path: Path) -> Iterator[list[str]]:
    """The command prefix that runs as a user who is not root but may use sudo (this one, if not root)."""
    if os.geteuid() != 0:
        yield []
        return
    if shutil.which("sudo") is None:
        apt_install("sudo")
    created = subprocess.run(["id", USER], capture_output=True).returncode != 0
    if created:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True)
    SUDOERS.write_text(f"{USER} ALL=(ALL) NOPASSWD: ALL\n")
    SUDOERS.chmod(0o440)
    try:
        yield ["sudo", "-u", USER]
    finally:
        SUDOERS.unlink(missing_ok=True)
        if created:
            subprocess.run(["userdel", "--remove", USER], capture_output=True)


@pytest.fixture
def scripts() -> Iterator[Path]:
    """A copy of what broker.sh reads, where any user can read it (a checkout, or pytest's tmp, may not be)."""
    tree = Path(tempfile.mkdtemp(prefix="splitmq-deploy-", dir="/tmp"))
    try:
        for part in ("deploy", "broker_config"):
            shutil.copytree(REPO / part, tree / part)
        for path in [tree, *tree.rglob("*")]:
            path.chmod(0o755)
        yield tree / "deploy" / "broker.sh"
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _broker(prefix: list[str], script: Path, action: str) -> subprocess.CompletedProcess[str]:
    env = [f"{k}={v}" for k, v in {**NODE, "STATE_ROOT": str(STATE_ROOT)}.items()]
    return subprocess.run([*prefix, "env", *env, str(script), action], capture_output=True, text=True, timeout=300)


def _answers() -> bool:
    try:
        pika.BlockingConnection(pika.URLParameters(f"amqp://guest:guest@localhost:{NODE['AMQP_PORT']}/%2F")).close()
        return True
    except pika.exceptions.AMQPError:
        return False


def test_a_user_with_sudo_starts_and_stops_the_node_the_script_names(sudo_user: list[str], scripts: Path) -> None:
    # Given a user who is not root, with sudo, and a copy of the deploy scripts it can read
    assert subprocess.run([*sudo_user, "id", "-u"], capture_output=True, text=True).stdout.strip() != "0"
    try:
        # When the user starts a node of its own name and ports with deploy/broker.sh
        started = _broker(sudo_user, scripts, "start")
        # Then that node is up where it was named, run by the rabbitmq user, with broker_config/ (its metrics port)
        assert started.returncode == 0, started.stdout + started.stderr
        assert _answers(), f"nothing answers AMQP on {NODE['AMQP_PORT']}: {started.stdout}{started.stderr}"
        pid = (STATE_ROOT / f"broker-{NODE['NODE']}" / "rabbitmq.pid").read_text().split()[0]
        uid = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Uid:"))
        assert uid == _uid("rabbitmq")
        with urllib.request.urlopen(f"http://localhost:{NODE['PROM_PORT']}/metrics", timeout=30) as answer:
            assert b"rabbitmq_" in answer.read(), f"no RabbitMQ metrics on {NODE['PROM_PORT']}"
        # And the same user stops it
        stopped = _broker(sudo_user, scripts, "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        wait_for(lambda: not _answers(), f"the node on {NODE['AMQP_PORT']} to stop")
    finally:
        _broker([], scripts, "stop")
        shutil.rmtree(STATE_ROOT / f"broker-{NODE['NODE']}", ignore_errors=True)


def _uid(user: str) -> str:
    return subprocess.run(["id", "-u", user], capture_output=True, text=True, check=True).stdout.strip()
