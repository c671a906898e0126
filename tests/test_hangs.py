"""The ways parties used to wait silently, as real processes on the real broker (issue 10).

Ordering and bookkeeping cases run on the stub transport in tests/workers/test_party_loop.py;
the ones here need processes, leases, a broker that is down, or broker users.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pika
import pytest

from splitmq.shared import local, topology, wire
from splitmq.shared.amqp import get_messages
from splitmq.shared.broker import Broker
from splitmq.shared.config import BottomSync, JobConfig
from splitmq.workers import cli
from splitmq.workers.exits import ExitReason
from tests.conftest import AS_ROOT, RESTART_ADMIN, RESTART_NODE, delete_job, node
from tests.helpers import Party, assert_segments_equal, consumers, in_thread, job_file, server_party, wait_for, worker_party
from tests.test_crash_recovery import assert_equal_to_local, assert_exactly_once


def test_a_transient_handler_error_with_four_in_flight_still_applies_every_batch_exactly_once(
        amqp_url: str, job_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given four batches in flight and a trainer whose handler fails once on a middle batch
    cfg = JobConfig(job_id=job_id, epochs=1, max_in_flight=4, bottom_sync=BottomSync.INDEPENDENT)
    top = in_thread("server", cfg, amqp_url)
    role, real, failed = top.roles[1], top.roles[1].handle, []

    def flaky(inc: Any) -> Any:
        if isinstance(inc.msg, wire.Forward) and inc.msg.train and inc.msg.seq == 10 and not failed:
            failed.append(10)
            raise RuntimeError("transient")
        return real(inc)
    monkeypatch.setattr(role, "handle", flaky)
    # When the owner trains
    owner = in_thread("worker", cfg, amqp_url, evaluate=False).wait()
    # Then every batch sent was applied once by the trainer and once by the owner
    assert failed == [10] and owner.reason is ExitReason.DONE, owner.detail
    assert role.ledger.count("client-0") == owner.summary["batches"] == 63 and role.stage.version == 63
    assert top.wait().reason is ExitReason.DONE


def test_a_transient_handler_error_in_a_synchronous_run_leaves_the_weights_of_local_training(
        amqp_url: str, job_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given one batch in flight and a trainer whose handler fails once on batch 5
    cfg = JobConfig(job_id=job_id, epochs=1, bottom_sync=BottomSync.INDEPENDENT)
    top = in_thread("server", cfg, amqp_url)
    role, real, failed = top.roles[1], top.roles[1].handle, []

    def flaky(inc: Any) -> Any:
        if isinstance(inc.msg, wire.Forward) and inc.msg.train and inc.msg.seq == 5 and not failed:
            failed.append(5)
            raise RuntimeError("transient")
        return real(inc)
    monkeypatch.setattr(role, "handle", flaky)
    owner = in_thread("worker", cfg, amqp_url, evaluate=False)
    assert owner.wait().reason is ExitReason.DONE and top.wait().reason is ExitReason.DONE
    # Then the retry changed nothing: both segments equal uninterrupted local training
    assert failed == [5]
    assert_segments_equal([owner.roles[0].stage.segment.state_dict(), role.stage.segment.state_dict()],
                          local.train_local(cfg).segments)


def test_a_second_worker_with_the_same_client_id_is_refused_saying_why(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given an owner running as client-0, waiting for its trainer (it holds its name meanwhile)
    cfg = JobConfig(job_id=job_id, epochs=1, bottom_sync=BottomSync.INDEPENDENT)
    job = job_file(cfg, tmp_path)
    first = worker_party(tmp_path, job, amqp_url, 0, "--no-eval", ckpt=False).start()
    wait_for(lambda: "serving job" in first.log.read_text(), "the first owner to connect")
    # When a second process starts as client-0
    second = Party(tmp_path, "second", "worker", ["--config", str(job), "--amqp-url", amqp_url,
                                                  "--client-id", "client-0", "--lease-timeout", "3"]).start()
    # Then it is refused within seconds with a message naming the problem
    assert second.wait(120) == 3, second.tail()
    assert "another party named 'client-0' is running" in second.log.read_text()
    # And the first is unharmed: once its trainer starts, it trains to the end
    top = server_party(tmp_path, job, amqp_url, ckpt=False).start()
    assert first.wait() == 0 and top.wait() == 0, first.tail() + top.tail()


def test_a_second_trainer_for_the_same_stage_is_refused(amqp_url: str, job_id: str, tmp_path: Path) -> None:
    cfg = JobConfig(job_id=job_id, epochs=1)
    job = job_file(cfg, tmp_path)
    top = server_party(tmp_path, job, amqp_url, "--serve-forever", ckpt=False).start()
    wait_for(lambda: top.metric("splitmq_reconnects_total", role="trainer") >= 0, "the first trainer")
    again = server_party(tmp_path, job, amqp_url, "--lease-timeout", "3", name="again", ckpt=False).start()
    assert again.wait(120) == 3, again.tail()
    assert "another party named 'top' is running" in again.log.read_text()
    assert top.stop() == 130


def test_a_worker_whose_trainer_died_says_what_it_waits_for_and_gives_up_by_name(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given an owner training against a trainer that then dies for good
    cfg = JobConfig(job_id=job_id, epochs=5, bottom_sync=BottomSync.INDEPENDENT)
    job = job_file(cfg, tmp_path)
    top = server_party(tmp_path, job, amqp_url, ckpt=False).start()
    owner = worker_party(tmp_path, job, amqp_url, 0, "--no-eval", "--peer-timeout", "20", ckpt=False).start()
    wait_for(lambda: owner.applied("worker") >= 3, "progress")
    top.kill()
    # Then the owner logs what it waits for, then exits with the documented code and reason
    assert owner.wait(180) == 75, owner.tail()
    text = owner.log.read_text()
    assert "waiting for the answer to batch" in text and "since" in text
    assert "exit peer_silent: gave up after 20s waiting for the answer to batch" in text
    assert owner.summary()["exit"] == "peer_silent"


def test_a_broker_that_does_not_answer_is_retried_with_a_log_line_per_attempt_then_a_named_exit(
        tmp_path: Path) -> None:
    owner = Party(tmp_path, "owner", "worker", ["--amqp-url", "amqp://guest:guest@127.0.0.1:5699/%2F",
                                                "--broker-timeout", "4"]).start()
    assert owner.wait(120) == 69, owner.tail()
    text = owner.log.read_text()
    assert "attempt 1" in text and "attempt 2" in text and "exit broker_unavailable" in text


def test_parties_started_while_the_broker_is_down_train_once_it_comes_up(
        restart_node: str, tmp_path: Path) -> None:
    # Given the broker node is down when an edge owner and its trainer boot
    job = "boot" + uuid.uuid4().hex[:8]
    cfg = JobConfig(job_id=job, epochs=1, bottom_sync=BottomSync.INDEPENDENT)
    jobf = job_file(cfg, tmp_path)
    node("stop")
    top = server_party(tmp_path, jobf, restart_node, ckpt=False).start()
    owner = worker_party(tmp_path, jobf, restart_node, 0, "--no-eval", ckpt=False).start()
    try:
        wait_for(lambda: "attempt 2" in owner.log.read_text(), "the owner's retries")
        # When the broker comes up
        node("start")
        # Then both connect by themselves and finish the job
        assert owner.wait() == 0 and top.wait() == 0, owner.tail() + top.tail()
        assert owner.summary()["completed"]
    finally:
        owner.close()
        top.close()
        node("start")


def disk_alarm(on: bool) -> None:
    """Raise (or clear, back to the shipped 1GB limit) a free-disk alarm on our own node."""
    subprocess.run([*AS_ROOT, "rabbitmqctl", "-n", f"{RESTART_NODE['NODE']}@localhost", "set_disk_free_limit",
                    "1000000GB" if on else "1GB"], check=True, timeout=120, stdout=subprocess.DEVNULL)


def status_alarms(job: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "splitmq", "status", "--job-id", job, "--json", "--management-url",
                          RESTART_ADMIN, "--trainer-metrics", "http://127.0.0.1:1/metrics"],
                         capture_output=True, text=True, timeout=60)
    return list(json.loads(out.stdout)["alarms"] or [])


def test_a_disk_alarm_mid_run_is_named_by_the_parties_it_blocks_and_training_resumes_exactly_once(
        restart_node: str, tmp_path: Path, parties: list[Party]) -> None:
    # Given a synchronous job training on a broker node of our own, both sides checkpointing
    cfg = JobConfig(job_id="alarm" + uuid.uuid4().hex[:8], epochs=3, bottom_sync=BottomSync.INDEPENDENT)
    jobf = job_file(cfg, tmp_path)
    top, owner = server_party(tmp_path, jobf, restart_node), worker_party(tmp_path, jobf, restart_node, 0, "--no-eval")
    parties += [top.start(), owner.start()]
    wait_for(lambda: owner.applied("worker") >= 10, "the owner's progress")
    # When the node's free disk falls below its limit (a disk alarm: RabbitMQ blocks every publisher)
    disk_alarm(True)
    try:
        # Then the party that publishes first under the alarm (the owner its next batch or the trainer
        # its answer: the machine's timing decides) says that the broker blocks it and why, and from
        # then on waits on the broker, not on its peer
        said = "the broker blocks our publishes: low on disk"
        blocked: Party = wait_for(lambda: next((p for p in (owner, top) if said in p.log.read_text()), None),
                                  "a party's word that the broker blocks it")
        def waits() -> list[str]:  # the blocked party's wait lines since it said so
            later = blocked.log.read_text().split(said, 1)[1].splitlines()[1:]
            return [line for line in later if "waiting for" in line]
        wait_for(waits, f"the {blocked.name}'s wait line")
        assert all("waiting for the broker" in line and "(low on disk" in line for line in waits()), blocked.tail()
        # And `splitmq status` names the alarm
        wait_for(lambda: "low on disk" in " ".join(status_alarms(cfg.job_id)), "splitmq status to show the alarm")
    finally:
        disk_alarm(False)
    # And once the alarm clears, both finish by themselves, each batch applied exactly once, bit-identical
    assert owner.wait() == 0 and top.wait() == 0, owner.tail() + top.tail()
    assert "the broker takes our publishes again" in blocked.log.read_text(), blocked.tail()
    top_state, bottom = assert_exactly_once(tmp_path, 63 * cfg.epochs)
    assert_equal_to_local(cfg, top_state, bottom)
    delete_job(cfg.job_id, RESTART_ADMIN)


def test_least_privilege_users_train_with_the_default_averaging(
        amqp_url: str, job_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Given users made as docs/security.md says: a trainer and two owners, with no rights beyond theirs
    tag = uuid.uuid4().hex[:6]
    names = {"trainer": f"lp{tag}-t", "owners": [f"lp{tag}-{i}" for i in range(2)]}
    urls: dict[str, str] = {}
    try:
        for name, kind in [(names["trainer"], "add-trainer")] + [(n, "add-client") for n in names["owners"]]:
            assert cli.main(["broker", kind, name, "--job-id", job_id, "--json"]) == 0
            urls[name] = json.loads(capsys.readouterr().out)["amqp_url"]
        cfg = JobConfig(job_id=job_id, epochs=2, num_clients=2)  # bottom_sync average: the default
        job = job_file(cfg, tmp_path)
        # When they train, each as its own broker user, identity required
        top = server_party(tmp_path, job, urls[names["trainer"]], "--require-identity", ckpt=False).start()
        owners = [Party(tmp_path, n, "worker", ["--config", str(job), "--amqp-url", urls[n], "--client-id", n,
                                                "--client-index", str(i), "--no-eval"]).start()
                  for i, n in enumerate(names["owners"])]
        # Then both averaging rounds complete and everybody finishes
        for o in owners:
            assert o.wait() == 0, o.tail()
        assert top.wait() == 0, top.tail()
        assert "closing the epoch" not in top.log.read_text()  # no round had to time out
    finally:
        for name in [names["trainer"], *names["owners"]]:
            cli.main(["broker", "remove-client", name, "--job-id", job_id])


def test_an_oversized_body_is_refused_before_it_is_read_and_the_broker_refuses_the_absurd(
        amqp_url: str, job_id: str) -> None:
    # Given a trainer that knows its cut shape (an owner joined)
    from tests.stubs import owner_spec
    cfg = JobConfig(job_id=job_id, epochs=1, bottom_sync=BottomSync.INDEPENDENT)
    top = in_thread("server", cfg, amqp_url, serve_forever=True)
    wait_for(lambda: consumers(amqp_url, topology.forward_queue(job_id)), "the trainer to consume")
    client = Broker(amqp_url, name="big-client")
    client.start()
    client.wait_ready(30)
    try:
        hello = wire.Hello(job_id=job_id, client_id="client-0", seq=0, spec=owner_spec(cfg),
                           facts={"client_index": 0, "num_samples": 4000, "batches_per_epoch": 63})
        key = topology.forward_routing_key("client-0")
        client.publish(topology.activations_exchange(job_id), key, hello.encode(), message_id="h",
                       correlation_id="h", reply_to="client-0").result(30)
        wait_for(lambda: top.roles[1].members.model, "the join")
        # When a body of 1 MiB (a valid batch is at most ~330 KB) arrives
        client.publish(topology.activations_exchange(job_id), key, b"\x00" * (1 << 20), message_id="big",
                       reply_to="client-0").result(30)
        dead = wait_for(lambda: get_messages(amqp_url, topology.dead_letter_queue(job_id)), "the dead letter")
        # Then it is dead-lettered for its size (not as undecodable: it was never unpacked)
        assert dead[0].headers["x-splitmq-reason"] == "size"
    finally:
        client.close()
        top.finish()
    # And the broker itself refuses a body over its max_message_size (64 MiB)
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.AMQPError):
        ch.basic_publish("", "nowhere", b"\x00" * (70 << 20))
        conn.process_data_events(5)
    if conn.is_open:
        conn.close()
