"""``splitmq status``: parsing the trainer's metrics and the management API, and the whole view
against the real broker and a real /metrics endpoint."""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import pika
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from splitmq.shared import amqp, topology
from splitmq.shared.metrics import Metrics, serve
from splitmq.workers import status


def trainer_text(samples: int, loss: float, started: float, last: float) -> str:
    registry = CollectorRegistry()
    m = Metrics("trainer", registry)
    m.samples.labels("trainer").inc(samples)
    m.batches.labels("trainer", "applied").inc(samples // 64)
    m.loss.labels("trainer").set(loss)
    m.clients.labels("trainer").set(2)
    m.last_progress.labels("trainer").set(last)
    m.reject("shape")
    m.reject("decode")
    text = generate_latest(registry).decode()
    return text + f"process_start_time_seconds {started}\n"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    status.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["status", *argv])


def test_a_trainer_endpoint_becomes_one_party_with_its_throughput() -> None:
    # Given a trainer's exposition: 6400 samples between its start and its last batch 10 s later
    text = trainer_text(6400, 0.25, started=1000.0, last=1010.0)
    # When it is parsed
    (party,) = status.parse_parties(text, "http://localhost:9400/metrics")
    # Then the party has its samples, loss, clients, summed rejections and average throughput
    assert party.role == "trainer" and party.samples == 6400 and party.batches_applied == 100
    assert party.loss == 0.25 and party.clients_active == 2 and party.rejected == 2
    assert party.samples_per_second() == pytest.approx(640.0)


def test_a_pushgateway_exposition_gives_one_party_per_client() -> None:
    # Given two workers' pushed groups as the gateway exposes them (instance = client id)
    lines = []
    for client, samples in (("client-0", 128), ("client-1", 64)):
        lines.append(f'splitmq_samples_total{{instance="{client}",job="splitmq-worker",role="worker"}} {samples}')
        lines.append(f'splitmq_loss{{instance="{client}",job="splitmq-worker",role="worker"}} 0.5')
        lines.append(f'push_time_seconds{{instance="{client}",job="splitmq-worker"}} 1.7e9')
    # When it is parsed
    parties = status.parse_parties("\n".join(lines) + "\n", "http://gw:9091/metrics")
    # Then each client is its own row
    assert [(p.source, p.samples) for p in parties] == [("client-0", 128), ("client-1", 64)]


def management_queues(job: str) -> list[dict[str, Any]]:
    return [
        {"name": topology.forward_queue(job), "messages_ready": 3, "messages_unacknowledged": 1, "consumers": 1,
         "message_stats": {"publish_details": {"rate": 40.0}}},
        {"name": topology.reply_queue(job, "client-0"), "messages_ready": 0, "messages_unacknowledged": 0,
         "consumers": 1, "message_stats": {"deliver_get": 130, "deliver_get_details": {"rate": 12.5}}},
        {"name": topology.reply_queue(job, "client-1"), "messages_ready": 2, "messages_unacknowledged": 0,
         "consumers": 0, "idle_since": "2026-11-22 03:00:00"},
        {"name": topology.dead_letter_queue(job), "messages_ready": 5, "messages_unacknowledged": 0, "consumers": 0},
        {"name": topology.forward_queue("otherjob"), "messages_ready": 9, "consumers": 1},
    ]


def test_watching_gives_each_partys_current_rate_between_refreshes() -> None:
    # Given two snapshots of a trainer 2 s apart, 640 samples more in the second
    before = status.parse_parties(trainer_text(640, 0.5, started=1000.0, last=1010.0), "t")
    after = status.parse_parties(trainer_text(1280, 0.4, started=1000.0, last=1012.0), "t")
    # When the current rates are computed and shown
    rates = status.current_rates(before, after, 2.0)
    text = status.render(after, [], [], job="mnist", now=1012.0, rates=rates)
    # Then the trainer runs at 320 samples/s now
    assert rates == {("t", "trainer"): 320.0}
    assert "  320.0 " in text


def test_the_management_api_answer_is_classified_into_the_jobs_queues() -> None:
    # Given the management API's queue list with two jobs' queues
    # When the rows for job "mnist" are built
    rows = status.queue_rows(management_queues("mnist"), "mnist")
    # Then only that job's queues appear, forward first, then each client's reply queue, then the DLQ
    assert [(r.kind, r.owner) for r in rows] == [("forward", "top"), ("reply", "client-0"),
                                                  ("reply", "client-1"), ("dlq", "")]
    assert rows[0].publish_rate == 40.0 and rows[2].idle_since == "2026-11-22 03:00:00"


def test_the_view_shows_clients_seen_queue_depths_and_dead_letters() -> None:
    # Given a trainer party and the job's queues
    parties = status.parse_parties(trainer_text(640, 0.3, started=1000.0, last=1010.0), "http://localhost:9400/metrics")
    rows = status.queue_rows(management_queues("mnist"), "mnist")
    # When the view is rendered
    text = status.render(parties, rows, ["http://localhost:9401/metrics (refused)"], job="mnist", now=1020.0)
    # Then it names the clients with their state, the depths, the dead letters and what was unreachable
    assert "clients seen (reply queues): 2" in text
    assert "client-0                 connected    receiving 12.5 gradients/s (130 so far)" in text
    assert "client-1" in text and "no consumer" in text and "idle since 2026-11-22 03:00:00" in text
    assert "localhost:9400" in text and "10s ago" in text
    assert "dead letters: 5 in the dead-letter queue; 2 rejected" in text
    assert "unreachable: http://localhost:9401/metrics (refused)" in text


def test_status_reads_a_live_trainer_endpoint_and_the_real_brokers_management_api(
        amqp_url: str, job_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a job's queues on the real broker with two clients, one dead letter,
    registry = CollectorRegistry()
    metrics = Metrics("trainer", registry)
    metrics.samples.labels("trainer").inc(320)
    port = serve(0, registry, addr="127.0.0.1")
    amqp.declare(amqp_url, topology.job_layout(job_id, parties=("client-0", "client-1")))
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().basic_publish(topology.dead_letter_exchange(job_id), "", b"poison")
    conn.close()
    args = parse(["--job-id", job_id, "--trainer-metrics", f"http://127.0.0.1:{port}/metrics", "--json"])

    # When splitmq status --json runs (the management API refreshes queue counts every few
    # seconds, so poll until the dead letter shows)
    def snapshot() -> dict[str, Any] | None:
        assert args.func(args) == 0
        out = json.loads(capsys.readouterr().out)
        dlq = [q for q in out["queues"] if q["kind"] == "dlq"]
        return out if dlq and dlq[0]["ready"] == 1 else None

    deadline = time.monotonic() + 30
    out = snapshot()
    while out is None and time.monotonic() < deadline:
        time.sleep(0.5)
        out = snapshot()
    # Then it shows the trainer's samples, both clients' reply queues and the dead letter
    assert out is not None, "the dead letter never showed in the management API"
    assert [p["samples"] for p in out["parties"]] == [320]
    assert sorted(q["owner"] for q in out["queues"] if q["kind"] == "reply") == ["client-0", "client-1"]
    assert out["errors"] == []
    # And the broker's (absent) resource alarms, read from its nodes
    assert out["alarms"] == []


def test_a_broker_alarm_is_shown_as_blocking_every_publisher_and_an_unknown_one_is_not_claimed_absent() -> None:
    # Given a cluster's /api/nodes answer with a disk alarm on one node
    nodes = [{"name": "rabbit@a", "mem_alarm": False, "disk_free_alarm": True},
             {"name": "rabbit@b", "mem_alarm": False, "disk_free_alarm": False}]
    alarms = status.node_alarms(nodes)
    assert alarms == ["rabbit@a: low on disk"]
    # Then the view names it and what it does; with no answer, it says nothing rather than "none"
    assert "broker alarms: rabbit@a: low on disk (every publisher is blocked" in status.render(
        [], [], [], job="j", now=0.0, alarms=alarms)
    assert "broker alarms: none" in status.render([], [], [], job="j", now=0.0, alarms=[])
    assert "broker alarms" not in status.render([], [], [], job="j", now=0.0, alarms=None)


def test_status_exits_non_zero_when_nothing_answers(capsys: pytest.CaptureFixture[str]) -> None:
    # Given endpoints nobody listens on
    args = parse(["--trainer-metrics", "http://127.0.0.1:1/metrics", "--management-url", "http://127.0.0.1:1"])
    # When status runs
    code = args.func(args)
    # Then it says what it could not reach, and exits 1
    assert code == 1
    assert capsys.readouterr().out.count("unreachable:") == 2


def test_a_party_that_has_not_trained_or_evaluated_yet_shows_no_data_rather_than_zeros() -> None:
    # Given a trainer that has applied nothing yet, and one that trained but never evaluated
    fresh = status.parse_parties(trainer_text(0, 0.0, started=1000.0, last=0.0), "fresh")
    trained = status.parse_parties(trainer_text(640, 0.3, started=1000.0, last=1010.0), "trained")
    # When the view is drawn
    view = status.render(fresh + trained, [], [], job="j", now=1020.0)
    fresh_line = next(line for line in view.splitlines() if line.startswith("fresh"))
    trained_line = next(line for line in view.splitlines() if line.startswith("trained"))
    # Then the fresh one says "no data" for loss and accuracy; the trained one shows its loss
    assert fresh_line.count("no data") == 2 and "0.0000" not in fresh_line
    assert "0.3000" in trained_line and trained_line.count("no data") == 1
