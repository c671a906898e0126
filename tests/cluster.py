"""A three-node RabbitMQ cluster on this machine for the failover tests, made by deploy/cluster.sh.

The nodes have their own names (``splitmq-test1..3@localhost``), ports (AMQP 5831-5833,
management 15831-15833) and state directories, apart from the shared node on 5672 and the
restart nodes (5690, 59x0). A node is killed the hard way (SIGKILL to its Erlang VM) and started
again with deploy/broker.sh, which brings it back into the cluster with its data; or cut off from
the others (a network partition, made with Erlang cookies) and healed.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pytest

from tests.conftest import AS_ROOT, STATE_ROOT

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "splitmq-test"
BASE_PORT = 5830
SIZE = 3
#: Longest wait for a node to boot, join, drain or revive on a busy 2-core machine.
NODE_DEADLINE_S = 240.0
#: Longest any one command that keeps a failed test's evidence may run: keeping it never hangs.
EVIDENCE_CMD_S = 20
#: Longest all of one failed test's evidence may take (each quorum_status starts a CLI VM).
EVIDENCE_BUDGET_S = 240.0
#: At most this many quorum queues get a quorum_status each, the failed test's own first.
EVIDENCE_QUEUES = 30

log = logging.getLogger(__name__)


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
        subprocess.run([*AS_ROOT, "kill", "-KILL", str(pid)], check=True, timeout=30)  # the VM is the rabbitmq user's
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
        return self._run([*AS_ROOT, "rabbitmqctl", "-q", "-n", self.name(i), *args])

    def refuse_clients(self, i: int) -> None:
        """Node ``i`` stops taking client connections and closes the ones it has (its queue replicas,
        unlike under `rabbitmq-upgrade drain`, keep running: the queues keep their quorum)."""
        self._ctl(i, "eval", "rabbit_maintenance:suspend_all_client_listeners().")
        self._ctl(i, "close_all_connections", "--global", "moving the parties (test)")

    def take_clients(self, i: int) -> None:
        self._ctl(i, "eval", "rabbit_maintenance:resume_all_client_listeners().")

    def cut_off(self, i: int) -> None:
        """Partition node ``i`` from the other nodes: it now presents them a cookie they refuse, and
        they present it theirs, which it refuses for them, so no side can reconnect until ``heal``.
        The CLI still reaches every node (its own connection keeps the shared cookie)."""
        self._ctl(i, "eval", f"[begin erlang:set_cookie(N, splitmq_cut_off), erlang:disconnect_node(N) end "
                             f"|| N <- {self._others(i)}], ok.")

    def heal(self, i: int) -> None:
        """End ``cut_off(i)``: node ``i`` presents the shared cookie to the others again."""
        self._ctl(i, "eval", f"C = erlang:get_cookie(), [erlang:set_cookie(N, C) || N <- {self._others(i)}], ok.")

    def _others(self, i: int) -> str:
        return "[" + ", ".join(f"list_to_atom(\"{self.name(j)}\")" for j in self.nodes if j != i) + "]"

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

    def leader(self, queue: str) -> int | None:
        """The node leading ``queue``, or None while the management API shows no leader (mid-election)."""
        name = self.api(f"/queues/%2F/{urllib.request.quote(queue, safe='')}").get("leader")
        return None if name is None else self.index(name)

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


# ---- evidence of a failed test, kept before the module's cluster is removed ----

def evidence_root() -> Path:
    """Where failed tests keep their evidence, one folder each: $SPLITMQ_EVIDENCE_DIR (a CI
    artifact folder), else a new folder under /tmp named by the UTC time."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(os.environ.get("SPLITMQ_EVIDENCE_DIR") or f"/tmp/splitmq-cluster-evidence-{stamp}")


def queue_names(cluster: Cluster) -> set[str] | None:
    """Every queue's name now (management API: milliseconds, so passing tests pay nothing), or None."""
    try:
        return {str(q["name"]) for q in cluster.api("/queues?columns=name")}
    except (AssertionError, OSError, ValueError, KeyError, TypeError):
        return None


class Evidence:
    """A folder of evidence: commands' output and copied files. Each command runs under `timeout`,
    all of them within EVIDENCE_BUDGET_S; an error is logged and listed in errors.txt, never raised."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.deadline = time.monotonic() + EVIDENCE_BUDGET_S
        dest.mkdir(parents=True, exist_ok=True)

    def error(self, what: str) -> None:
        log.warning("cluster evidence: %s", what)
        try:
            with open(self.dest / "errors.txt", "a") as f:
                f.write(what + "\n")
        except OSError:
            pass  # logged above; the folder itself is what failed

    def run(self, name: str, *argv: str) -> str:
        """``argv``'s stdout, also written to ``name`` (and the command to commands.txt); "" if it
        failed or time ran out."""
        cmd = " ".join(argv)
        if time.monotonic() > self.deadline:
            self.error(f"{cmd}: skipped, past the {EVIDENCE_BUDGET_S:.0f}s budget")
            return ""
        try:
            done = subprocess.run(["timeout", "-k", "5", str(EVIDENCE_CMD_S), *argv], capture_output=True,
                                  text=True, timeout=EVIDENCE_CMD_S + 15, check=False)
            (self.dest / name).write_text(done.stdout)
            with open(self.dest / "commands.txt", "a") as f:
                f.write(f"{name}: {cmd} (exit {done.returncode})\n")
        except (OSError, subprocess.SubprocessError) as exc:
            self.error(f"{cmd}: {exc!r}")
            return ""
        if done.returncode != 0:  # 124: killed by `timeout`
            self.error(f"{cmd}: exit {done.returncode} after at most {EVIDENCE_CMD_S}s: {done.stderr[-500:]}")
        return done.stdout

    def copy(self, src: Path, name: str) -> None:
        try:
            if src.is_dir():
                shutil.copytree(src, self.dest / name, dirs_exist_ok=True)
            else:
                (self.dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, self.dest / name)
        except OSError as exc:
            self.error(f"copying {src}: {exc!r}")


def collect_evidence(cluster: Cluster, dest: Path, before: set[str] | None = None,
                     party_logs: Path | None = None) -> Path:
    """Keep under ``dest`` (returned) what a failed test leaves on the cluster: each node's RabbitMQ
    logs; from each running node, `cluster_status` and `list_queues` (leader, members, online,
    messages); `quorum_status` of the quorum queues, those not in ``before`` (the test's own) first;
    and the parties' logs under ``party_logs``. Never raises for a command or copy that fails."""
    ev = Evidence(dest)
    for i in cluster.nodes:
        ev.copy(STATE_ROOT / f"broker-{PREFIX}{i}" / "log", f"node{i}-log")
    up = [i for i in cluster.nodes if cluster.up(i)]
    listing = ""
    for i in up:
        ev.run(f"node{i}-cluster_status.txt", *AS_ROOT, "rabbitmqctl", "-n", cluster.name(i), "cluster_status")
        out = ev.run(f"node{i}-list_queues.json", *AS_ROOT, "rabbitmqctl", "-q", "-n", cluster.name(i), "list_queues",
                     "name", "type", "leader", "members", "online", "messages", "--formatter", "json")
        listing = listing or out
    for q in quorum_queues(listing, before)[:EVIDENCE_QUEUES]:
        ev.run(f"quorum_status-{re.sub(r'[^A-Za-z0-9._-]', '_', q)}.json", *AS_ROOT, "rabbitmq-queues", "-n",
               cluster.name(up[0]), "quorum_status", q, "--vhost", "/", "--formatter", "json")
    if not up:
        ev.error("no node answers: no cluster_status, list_queues or quorum_status")
    if party_logs is not None:
        for f in sorted(party_logs.rglob("*.log")):
            ev.copy(f, f"parties/{f.relative_to(party_logs)}")
    return dest


def quorum_queues(listing: str, before: set[str] | None) -> list[str]:
    """The quorum queues in a `list_queues --formatter json`, those not in ``before`` first."""
    try:
        rows = json.loads(listing or "[]")
        names = [str(r["name"]) for r in rows if r.get("type") == "quorum"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []
    return sorted(names, key=lambda n: (before is not None and n in before, n))
