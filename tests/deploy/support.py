"""Helpers of the deployment tests (fixtures are in conftest.py): paths, ports, running
commands, a test copy of the Prometheus configuration, and the test stack's HTTP API."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.conftest import AS_ROOT

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "deploy" / "stack.sh"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
#: Ports of the test stack, clear of a real one on 9090/9091.
TEST_PROMETHEUS_PORT = 19090
TEST_PUSHGATEWAY_PORT = 19091
#: Where the monitoring test's trainer (base) and workers (base+1+i) serve metrics.
TEST_METRICS_BASE = 9500


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def apt_install(package: str) -> None:
    run([*AS_ROOT, "apt-get", "update", "-q"])
    done = run([*AS_ROOT, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
                "--no-install-recommends", package])  # through sudo: env passes what sudo would drop
    assert done.returncode == 0, f"apt-get install {package} failed:\n{done.stderr}"


def make_test_config(tmp: Path, *, scrape_interval: str = "1s") -> Path:
    """A copy of the project's prometheus.yml pointing at the test ports, with fast scrapes.

    Only the targets' ports and the intervals change; jobs, paths, params and rules are the
    project's own. The monitoring test scrapes every 250 ms: a one-epoch worker trains for
    about a second on this data set, and Prometheus must see it mid-run.
    """
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    moves = {9400: TEST_METRICS_BASE, 9091: TEST_PUSHGATEWAY_PORT}
    moves.update({9400 + i: TEST_METRICS_BASE + i for i in range(1, 17)})
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            targets = []
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets.append(f"{host}:{moves.get(int(port), int(port))}")
            static["targets"] = targets
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp / "alerts.yml")
    out = tmp / "prometheus.yml"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


@dataclass(frozen=True)
class Stack:
    prometheus: str
    pushgateway: str
    env: dict[str, str]
    state: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Prometheus's HTTP API: an instant query's result vector."""
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return list(body["data"]["result"])


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0, every: float = 0.25) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
