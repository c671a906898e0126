"""Fixtures shared by the suite. Tests that claim the pipeline works use ``amqp_url``: a real
RabbitMQ, started by the README's test command (deploy/dev.sh test). No broker: the test
fails with a message saying how to start one; it is never skipped."""
from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Generator, Iterator

import pika
import pytest
import torch

from splitmq.bench.node import AS_ROOT  # noqa: F401  # the tests run the nodes' tools as the bench does
from splitmq.shared import defaults
from splitmq.workers import job_admin
from tests.helpers import Party

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/%2F")


@pytest.fixture(autouse=True)
def party_threads() -> None:
    """Each test starts on a party's torch thread count, as its in-process parties and the local
    baseline must for their sums to run in the same order (bit-for-bit comparisons). Set before
    every test, not once: a command run in-process sets its own count for the rest of the process
    (``splitmq audit`` computes on 2), and in-process parties started later compute on that count.
    Set once per session, it let a parity test that ran after the audit test read a loss 1 ulp off."""
    torch.set_num_threads(defaults.TORCH_THREADS)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except Exception as exc:  # any failure here means the same thing to the reader
        pytest.fail(f"no RabbitMQ at {AMQP_URL} ({exc!r}). Start one with deploy/broker.sh start, "
                    "or run the suite with deploy/dev.sh test, which starts it.")
    return AMQP_URL


@pytest.fixture
def job_id(amqp_url: str) -> Iterator[str]:
    """A fresh job id per test, so tests sharing the broker never see each other's messages;
    afterwards every queue and exchange of the job is deleted (as ``splitmq job delete`` does)."""
    job = "t" + uuid.uuid4().hex[:10]
    yield job
    delete_job(job)


def delete_job(job: str, admin_url: str = "http://guest:guest@localhost:15672") -> None:
    job_admin.delete_job(job, admin_url)


#: Where deploy/broker.sh keeps each node's state (broker-NODE/: pid file, logs, data).
STATE_ROOT = Path(os.environ.get("STATE_ROOT", "/var/lib/splitmq"))


def restart_node_of(worker: str) -> dict[str, str]:
    """The node that a test process's tests may stop and start; never the shared one on 5672.

    ``deploy/dev.sh test`` runs two test processes (pytest-xdist workers ``gw0``, ``gw1``, each
    given whole files): each has a node of its own, so one test stopping, filling or cutting off
    its node never touches a test running beside it. One process alone keeps 5690."""
    n = int(worker.removeprefix("gw") or 0)
    if n == 0:
        return {"NODE": "crash", "AMQP_PORT": "5690", "MGMT_PORT": "15691", "PROM_PORT": "15693"}
    base = 5900 + 10 * n  # clear of every other node's ports (5672, 568x, 5690s, 5750, 5790, 583x)
    return {"NODE": f"crash{n}", "AMQP_PORT": str(base), "MGMT_PORT": str(10000 + base),
            "PROM_PORT": str(10001 + base)}


RESTART_NODE = restart_node_of(os.environ.get("PYTEST_XDIST_WORKER", "gw0"))
RESTART_URL = f"amqp://guest:guest@localhost:{RESTART_NODE['AMQP_PORT']}/%2F"
#: The restart node's management API, where a test deletes its job afterwards.
RESTART_ADMIN = f"http://guest:guest@localhost:{RESTART_NODE['MGMT_PORT']}"
ROOT = Path(__file__).resolve().parents[1]


def node(action: str) -> None:
    """Start or stop the second node with the project's own script."""
    env = {**os.environ, **RESTART_NODE}
    subprocess.run([str(ROOT / "deploy/broker.sh"), action], env=env, check=True, timeout=300,
                   stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def restart_node() -> Iterator[str]:
    """A RabbitMQ node of this test process's own (``RESTART_NODE``) that a test may stop and start."""
    node("start")
    yield RESTART_URL
    node("stop")


@pytest.fixture
def parties() -> Iterator[list["Party"]]:
    """Every process a test starts; killed at the end whatever happened."""
    started: list[Party] = []
    yield started
    for p in started:
        p.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on its test (``item.rep_setup``, ``rep_call``, ``rep_teardown``), so
    that a fixture's teardown can tell whether its test failed: tests/test_cluster.py then keeps
    the cluster's logs and queue state before anything else touches them."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    if report.failed and report.when == "call":
        report.sections.append(("the shared broker when the test failed", _broker_state()))
    return report


def _broker_state() -> str:
    """Load average and the shared broker's last log lines: a test that failed on the broker (a
    handshake that timed out, confirms that did not come) says what the broker saw."""
    log = STATE_ROOT / "broker-splitmq" / "log" / "splitmq@localhost.log"
    try:
        lines = [line[:240] for line in log.read_text(errors="replace").splitlines()[-40:]]
    except OSError as exc:
        lines = [f"(no broker log: {exc})"]
    return f"load average: {Path('/proc/loadavg').read_text().strip()}\n" + "\n".join(lines)
