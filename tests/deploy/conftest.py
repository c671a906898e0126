"""Fixtures for the deployment tests: the tools they run, and a Prometheus + Pushgateway started
by deploy/stack.sh with a test copy of deploy/prometheus/prometheus.yml (helpers: support.py).

Tools missing on a fresh machine (promtool, prometheus, systemd-analyze) are installed by the
project's scripts (deploy/stack.sh install) or apt, never skipped."""
from __future__ import annotations

import shutil
from typing import Iterator

import pytest

from tests.deploy.support import (STACK, TEST_PROMETHEUS_PORT, TEST_PUSHGATEWAY_PORT, Stack, apt_install,
                                  make_test_config, run)


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool, installed with Prometheus by deploy/stack.sh install when missing."""
    if shutil.which("promtool") is None:
        done = run([str(STACK), "install"])
        assert done.returncode == 0, done.stdout + done.stderr
    path = shutil.which("promtool")
    assert path, "deploy/stack.sh install did not provide promtool"
    return path


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    """systemd-analyze (package systemd; it runs without systemd being PID 1)."""
    if shutil.which("systemd-analyze") is None:
        apt_install("systemd")
    path = shutil.which("systemd-analyze")
    assert path, "apt-get install systemd did not provide systemd-analyze"
    return path


@pytest.fixture(scope="module")
def monitoring_stack(tmp_path_factory: pytest.TempPathFactory, amqp_url: str) -> Iterator[Stack]:
    """Prometheus and a Pushgateway started by ``deploy/stack.sh start`` (the broker is the
    suite's, already running: stack.sh leaves a broker that answers alone), stopped at the end."""
    tmp = tmp_path_factory.mktemp("stack")
    env = {"PROMETHEUS_PORT": str(TEST_PROMETHEUS_PORT), "PUSHGATEWAY_PORT": str(TEST_PUSHGATEWAY_PORT),
           "PROMETHEUS_CONFIG": str(make_test_config(tmp / "config", scrape_interval="250ms")),
           "MON_STATE": str(tmp / "state")}
    started = run([str(STACK), "start"], env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield Stack(prometheus=f"http://127.0.0.1:{TEST_PROMETHEUS_PORT}",
                    pushgateway=f"http://127.0.0.1:{TEST_PUSHGATEWAY_PORT}", env=env, state=tmp / "state")
    finally:
        stopped = run([str(STACK), "stop"], env=env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
