"""TLS end to end: deploy/tls.sh makes the certificates, deploy/broker.sh starts a second node
with only a verifying TLS listener (plain TCP off), and parties connect over amqps:// checking
the broker's certificate and presenting their own (the node requires one).

The node runs on this module's own ports, with its own state directory, and is stopped in
teardown; the shared node on 5672 is never touched.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client import CollectorRegistry

from splitmq.shared import topology
from splitmq.shared.amqp import declare
from splitmq.shared.broker import Broker, Delivery
from splitmq.shared.config import BottomSync, JobConfig
from splitmq.shared.errors import BrokerError
from splitmq.shared.metrics import Metrics
from splitmq.workers import cli, runtime, server, worker
from splitmq.workers.exits import ExitReason
from splitmq.workers.stats import Stats
from tests.conftest import AS_ROOT
from tests.stubs import Running

REPO = Path(__file__).resolve().parents[2]
NODE_ENV = {"NODE": "sec", "AMQP_PORT": "5680", "MGMT_PORT": "15680", "PROM_PORT": "15690", "TLS_PORT": "5681"}
TLS_URL = "amqps://guest:guest@localhost:5681/%2F"  # guest: loopback-only admin
WAIT_S = 20.0


@dataclass(frozen=True)
class TlsNode:
    tls_dir: Path
    other_ca: Path

    def tls(self, ca: Path | None = None) -> dict[str, str]:
        return {"ca": str(ca or self.tls_dir / "ca.pem"), "cert": str(self.tls_dir / "client.pem"),
                "key": str(self.tls_dir / "client.key")}


def sh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, cwd=REPO)


def plain_port_answers() -> bool:
    try:
        socket.create_connection(("127.0.0.1", int(NODE_ENV["AMQP_PORT"])), timeout=5).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def tls_node() -> Iterator[TlsNode]:
    # The broker runs as user rabbitmq: the directory must be traversable by it.
    base = Path(tempfile.mkdtemp(prefix="splitmq-tls-"))
    base.chmod(0o755)
    env = {**NODE_ENV, "STATE_ROOT": str(base / "state"), "TLS_DIR": str(base / "tls"),
           "TLS_FAIL_IF_NO_PEER_CERT": "true", "TLS_ONLY": "true"}
    try:
        for d in ("tls", "other"):
            made = sh(REPO / "deploy" / "tls.sh", "make", base / d, env=env)
            assert made.returncode == 0, made.stderr
        started = sh(REPO / "deploy" / "broker.sh", "start", env=env)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "already answers" not in started.stdout, "another broker holds port 5680"
        yield TlsNode(base / "tls", base / "other" / "ca.pem")
    finally:
        sh(REPO / "deploy" / "broker.sh", "stop", env=env)
        subprocess.run([*AS_ROOT, "rm", "-rf", str(base)], timeout=60)  # the node's state is the rabbitmq user's


def test_tls_make_keeps_existing_files_and_conf_points_at_them(tmp_path: Path) -> None:
    # Given certificates made once
    tls = REPO / "deploy" / "tls.sh"
    assert sh(tls, "make", tmp_path, env={}).returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # When made again, Then nothing changes (idempotent)
    assert sh(tls, "make", tmp_path, env={}).returncode == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert {"ca.pem", "server.pem", "server.key", "client.pem", "client.key"} <= set(before)
    # And the broker settings name them, with peer verification on the chosen port
    conf = sh(tls, "conf", tmp_path, env={"TLS_PORT": "5999"}).stdout
    assert "listeners.ssl.default = 5999" in conf and "ssl_options.verify = verify_peer" in conf
    assert f"ssl_options.cacertfile = {tmp_path}/ca.pem" in conf
    # And the keys are private
    assert (tmp_path / "client.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0


def test_a_client_verifying_the_broker_round_trips_a_message_over_amqps(tls_node: TlsNode) -> None:
    # Given a job declared over TLS, and a client that verifies the broker and shows its certificate
    job = "tls" + uuid.uuid4().hex[:8]
    declare(TLS_URL, topology.job_layout(job), tls_node.tls())
    got: list[Delivery] = []
    b = Broker(TLS_URL, name="tls-roundtrip", tls=tls_node.tls())
    b.start()
    b.wait_ready(WAIT_S)
    try:
        b.consume(topology.forward_queue(job), got.append)
        # When it publishes and consumes over amqps
        b.publish(topology.activations_exchange(job), topology.forward_routing_key("c1"), b"over tls",
                  message_id="m1").result(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)  # polling a condition under a deadline
        # Then the message made the round trip
        assert [d.body for d in got] == [b"over tls"]
    finally:
        b.close()


def test_a_client_given_a_list_with_a_dead_address_first_connects_over_amqps_to_the_live_one(
        tls_node: TlsNode) -> None:
    # Given an address list (a cluster's) whose first entry no broker answers, the TLS node second
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    job = "tls" + uuid.uuid4().hex[:8]
    urls = f"amqps://guest:guest@localhost:{dead}/%2F,{TLS_URL}"
    declare(urls, topology.job_layout(job), tls_node.tls())  # the admin path tries each address too
    got: list[Delivery] = []
    b = Broker(urls, name="tls-list", tls=tls_node.tls())
    # When it connects, verifying the broker against the CA
    b.start()
    b.wait_ready(WAIT_S)
    try:
        # Then it is connected to the TLS node and a message makes the round trip
        assert b.status() == "connected to localhost:5681"
        b.consume(topology.forward_queue(job), got.append)
        b.publish(topology.activations_exchange(job), topology.forward_routing_key("c1"), b"listed",
                  message_id="m1").result(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)  # polling a condition under a deadline
        assert [d.body for d in got] == [b"listed"]
    finally:
        b.close()


def test_the_tls_only_node_has_no_plain_amqp_listener(tls_node: TlsNode) -> None:
    # Given the node started with TLS_ONLY=true, When a plain TCP client knocks on its AMQP port
    # Then nobody answers
    assert not plain_port_answers()


def test_a_client_trusting_the_wrong_ca_fails_with_a_clear_error(tls_node: TlsNode) -> None:
    # Given a client whose CA bundle is another CA than the broker's
    b = Broker(TLS_URL, name="tls-wrong-ca", tls=tls_node.tls(ca=tls_node.other_ca))
    # When it connects, Then it fails at once, saying the certificate did not verify
    b.start()
    with pytest.raises(BrokerError, match="certificate did not verify"):
        b.wait_ready(WAIT_S)
    b.close()


def admin_args(tls_node: TlsNode) -> list[str]:
    tls = tls_node.tls()
    return ["--amqp-url", TLS_URL, "--admin-url", "http://localhost:15680", "--admin-tls-ca", tls["ca"],
            "--admin-tls-cert", tls["cert"], "--admin-tls-key", tls["key"]]


def add_user(capsys: pytest.CaptureFixture[str], tls_node: TlsNode, role: str, name: str, job: str,
             *extra: str) -> str:
    code = cli.main(["broker", f"add-{role}", name, "--job-id", job, "--json", *admin_args(tls_node),
                     "--public-url", "amqps://localhost:5681/%2F", *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    return str(json.loads(out)["amqp_url"])


def test_a_worker_and_the_trainer_train_over_amqps_as_least_privilege_users_with_identity_required(
        tls_node: TlsNode, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a trainer user and a client user made by `splitmq broker`, on the TLS node
    job = "tls" + uuid.uuid4().hex[:8]
    cfg = JobConfig(job_id=job, data="synthetic", epochs=1, bottom_sync=BottomSync.INDEPENDENT)
    trainer_url = add_user(capsys, tls_node, "trainer", f"trainer-{job}", job, "--may-declare")
    client_url = add_user(capsys, tls_node, "client", "client-0", job)
    try:
        # When they train one epoch over amqps, the trainer requiring broker-validated identity
        top = _run("server", cfg, trainer_url, tls_node.tls(), require_identity=True)
        owner = _run("worker", cfg, client_url, tls_node.tls(), evaluate=False)
        owner_end, top_end = owner.wait(), top.wait()
        # Then the run completes and the trainer rejected nothing
        assert owner_end.reason is ExitReason.DONE and owner_end.summary["completed"], owner_end.detail
        assert top_end.reason is ExitReason.DONE and top_end.summary["rejected"] == {}
    finally:
        for name in (f"trainer-{job}", "client-0"):
            cli.main(["broker", "remove-client", name, "--job-id", job, *admin_args(tls_node)])


def _run(kind: str, cfg: JobConfig, url: str, tls: dict[str, str], **opts: Any) -> Running:
    """A party in a thread, connecting over amqps as the given user (its user_id set on publishes)."""
    stats = Stats(Metrics("trainer" if kind == "server" else "worker", CollectorRegistry()))
    if kind == "server":
        roles, loop = server.build(cfg, server.ServerOptions(**opts), stats)
    else:
        roles, loop = worker.build(cfg, worker.WorkerOptions(**opts), stats)
        loop = dataclasses.replace(loop, user_id=runtime.broker_username(url))
    transport = Broker(url, name=loop.name, tls=tls, lease=topology.lease_queue(cfg.job_id, loop.name))
    return Running(roles, transport, loop, stats).start()  # type: ignore[arg-type]
