"""A three-node RabbitMQ cluster on this machine for the failover tests, made by deploy/cluster.sh.

The nodes have their own names (``splitmq-test1..3@localhost``), ports (AMQP 5831-5833,
management 15831-15833) and state directories, apart from the shared node on 5672 and the
restart node on 5690. A node is killed the hard way (SIGKILL to its Erlang VM) and started
again with deploy/broker.sh, which brings it back into the cluster with its data.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "splitmq-test"
BASE_PORT = 5830
SIZE = 3
STATE_ROOT = Path(os.environ.get("STATE_ROOT", "/var/lib/splitmq"))
#: Longest wait for a node to boot, join, drain or revive on a busy 2-core machine.
NODE_DEADLINE_S = 240.0


def _wait(condition: Any, timeout: float) -> Any:
    """The condition's value once true within ``timeout`` seconds, else a false value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return condition()


def _poll(condition: Any, what: str, timeout: float) -> Any:
    """The condition's value once true within ``timeout`` seconds; fails the test otherwise."""
    value = _wait(condition, timeout)
    if not value:
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
    return value


class Cluster:
    """Nodes 1..SIZE of the test cluster: URLs, kills, restarts, drains, and the management API."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self.nodes = list(range(1, size + 1))

    # ---- names and addresses -------------------------------------------------------------------

    def name(self, i: int) -> str:
        return f"{PREFIX}{i}@localhost"

    def index(self, name: str) -> int:
        return int(name.split("@")[0][len(PREFIX):])

    def port(self, i: int) -> int:
        return BASE_PORT + i

    def url(self, nodes: Iterable[int] | None = None) -> str:
        """The address list (comma-separated) of ``nodes`` (default: all), as a party is given it."""
        return ",".join(f"amqp://guest:guest@localhost:{self.port(i)}/%2F" for i in (nodes or self.nodes))

    def node_env(self, i: int) -> dict[str, str]:
        return {"NODE": f"{PREFIX}{i}", "NODE_HOST": "localhost", "AMQP_PORT": str(self.port(i)),
                "MGMT_PORT": str(BASE_PORT + 10000 + i), "PROM_PORT": str(BASE_PORT + 10100 + i)}

    # ---- the whole cluster ---------------------------------------------------------------------

    def _run(self, argv: list[str], env: dict[str, str] | None = None) -> str:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=NODE_DEADLINE_S,
                              env={**os.environ, "PREFIX": PREFIX, "BASE_PORT": str(BASE_PORT), **(env or {})})
        assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def start(self) -> str:
        return self._run([str(ROOT / "deploy/cluster.sh"), "local", "start", str(self.size)])

    def destroy(self) -> None:
        self._run([str(ROOT / "deploy/cluster.sh"), "local", "destroy", str(self.size)])

    # ---- one node ------------------------------------------------------------------------------

    def up(self, i: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port(i)), timeout=2).close()
        except OSError:
            return False
        return True

    def kill(self, i: int) -> float:
        """SIGKILL node ``i``'s Erlang VM; returns when (monotonic) it was killed."""
        pid = int((STATE_ROOT / f"broker-{PREFIX}{i}" / "rabbitmq.pid").read_text().strip())
        at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _poll(lambda: not self.up(i), f"node {i} to stop answering", 30)
        return at

    def restart(self, i: int) -> None:
        """Start node ``i`` again (it rejoins the cluster with its data), and wait until every other
        node counts it as running."""
        self._run([str(ROOT / "deploy/broker.sh"), "start"], env=self.node_env(i))
        _poll(lambda: self.name(i) in self.running(), f"node {i} to rejoin", NODE_DEADLINE_S)

    def ensure_all_up(self) -> None:
        for i in self.nodes:
            if not self.up(i):
                self.restart(i)

    def _ctl(self, i: int, *args: str) -> str:
        return self._run(["rabbitmqctl", "-q", "-n", self.name(i), *args])

    def refuse_clients(self, i: int) -> None:
        """Node ``i`` stops taking client connections and closes the ones it has (its queue replicas,
        unlike under `rabbitmq-upgrade drain`, keep running: the queues keep their quorum)."""
        self._ctl(i, "eval", "rabbit_maintenance:suspend_all_client_listeners().")
        self._ctl(i, "close_all_connections", "--global", "moving the parties (test)")

    def take_clients(self, i: int) -> None:
        self._ctl(i, "eval", "rabbit_maintenance:resume_all_client_listeners().")

    # ---- the management API ----------------------------------------------------------------------

    def api(self, path: str) -> Any:
        """GET from the management API of the first node that answers."""
        token = base64.b64encode(b"guest:guest").decode()
        errors = []
        for i in self.nodes:
            req = urllib.request.Request(f"http://localhost:{BASE_PORT + 10000 + i}/api{path}",
                                         headers={"Authorization": f"Basic {token}"})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return json.load(resp)
            except OSError as exc:
                errors.append(f"node {i}: {exc}")
        raise AssertionError(f"no management API answered: {errors}")

    def running(self) -> set[str]:
        return {n["name"] for n in self.api("/nodes?columns=name,running") if n.get("running")}

    def connections(self) -> list[tuple[str, int]]:
        """Every client connection now, as (its connection name, the index of the node it is on)."""
        live = next(i for i in self.nodes if self.up(i))
        out = self._ctl(live, "list_connections", "port", "client_properties", "--formatter", "json")
        return [(str(dict(_properties(c["client_properties"])).get("connection_name", "")), int(c["port"]) - BASE_PORT)
                for c in json.loads(out or "[]")]

    def consumers(self, queue: str) -> int:
        try:
            return int(self.api(f"/queues/%2F/{urllib.request.quote(queue, safe='')}").get("consumers", 0))
        except AssertionError:
            return 0

    def leader(self, queue: str) -> int:
        return self.index(self.api(f"/queues/%2F/{urllib.request.quote(queue, safe='')}")["leader"])

    def herd(self, target: int, parties: dict[str, int]) -> None:
        """Bring every party onto node ``target``: the other nodes refuse clients and close their
        connections, so the parties reconnect, through their address lists, to the one node that
        takes them; then the others take clients again. ``parties`` maps a connection name to how
        many connections of that name there are."""
        others = [i for i in self.nodes if i != target]

        def herded() -> bool:
            on = self.connections()
            return all(sum(1 for n, node in on if n == name and node == target) >= count
                       for name, count in parties.items())
        try:
            deadline = time.monotonic() + 120
            while True:  # again if a party got back onto another node between the closes
                for i in others:
                    self.refuse_clients(i)
                if _wait(herded, 20) or time.monotonic() > deadline:
                    break
            _poll(herded, f"{parties} to connect to node {target} (on: {self.connections()})", 1)
        finally:
            for i in others:
                self.take_clients(i)


def _properties(value: Any) -> list[tuple[str, Any]]:
    """rabbitmqctl's JSON of client properties: a list of [name, type, value] (or a plain map)."""
    if isinstance(value, dict):
        return list(value.items())
    return [(str(item[0]), item[-1]) for item in value if isinstance(item, list) and item]
