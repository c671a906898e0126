"""The party loop and its roles on the in-memory broker: ordering, dedupe, refusals, waits, exits.

Each test is one of the ways a party used to hang or stall silently (issue 10), and asserts
the named outcome that replaced it. Process- and broker-level cases are in test_hangs.py.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import pytest
import torch
from splitmq.shared import defaults, topology, wire
from splitmq.shared.config import JobConfig
from splitmq.shared.transport import StubBroker
from splitmq.workers import worker
from splitmq.workers.exits import ExitReason, Outages, Wait
from splitmq.workers.party import LoopOptions
from splitmq.workers.roles.base import Inbound, Incoming, Role, Step
from splitmq.workers.roles.owner_waits import OwnerTimeouts

from splitmq.workers.stats import Stats
from tests.stubs import Client, Running, forward, joined, owner_spec, start_server, start_worker, wait_for

CFG = JobConfig(job_id="stubjob", epochs=1, data="synthetic")


def dead_letters(hub: StubBroker, job: str) -> list[dict[str, Any]]:
    with hub.lock:
        return [m.props["headers"] for m in hub.queues[topology.dead_letter_queue(job)].ready]


def test_a_handler_error_on_a_middle_batch_is_retried_and_every_batch_is_applied_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given four batches in flight and a top whose handler fails once on batch 2
    cfg = CFG.replace(max_in_flight=4)
    hub = StubBroker()
    srv = start_server(hub, cfg)
    top = srv.roles[1]
    real, failed = top.handle, []

    def flaky(inc: Any) -> Any:
        if isinstance(inc.msg, wire.Forward) and inc.msg.train and inc.msg.seq == 2 and not failed:
            failed.append(2)
            raise RuntimeError("transient")
        return real(inc)
    monkeypatch.setattr(top, "handle", flaky)
    # When the owner trains its epoch
    owner = start_worker(hub, cfg).wait()
    # Then batch 2 was retried, not taken for a repeat: each batch applied exactly once on each side
    total = owner.summary["batches"]
    assert failed == [2] and owner.reason is ExitReason.DONE and owner.summary["completed"]
    assert top.ledger.count("client-0") == total and srv.stats.counts["applied"] == total
    assert srv.wait().reason is ExitReason.DONE
    assert dead_letters(hub, cfg.job_id) == []


def test_a_nan_gradient_ends_the_owner_with_a_named_exit_and_is_dead_lettered_with_its_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a top that has diverged: its gradient for batch 3 is NaN
    hub = StubBroker()
    srv = start_server(hub, CFG)
    stage = srv.roles[1].stage
    real = stage.loss_step

    def diverged(x: torch.Tensor, labels: torch.Tensor) -> Any:
        result = real(x, labels)
        if stage.version == 4:
            return result.__class__(math.nan, result.output, torch.full_like(result.grad_input, math.nan))
        return result
    monkeypatch.setattr(stage, "loss_step", diverged)
    # When the owner trains
    owner = start_worker(hub, CFG).wait()
    # Then it stops, saying why, and the gradient is in the dead-letter queue with its reason
    assert owner.reason is ExitReason.PEER_FAULT and "batch 3" in owner.detail and "non_finite" not in owner.detail
    assert "NaN" in owner.detail
    assert [h["x-splitmq-reason"] for h in dead_letters(hub, CFG.job_id)] == ["non_finite"]
    srv.finish()


def test_an_owner_whose_state_is_older_than_what_it_acknowledged_is_told_so_within_seconds() -> None:
    # Given an owner that trained without a checkpoint directory, and a top that keeps serving
    hub = StubBroker()
    srv = start_server(hub, CFG, serve_forever=True)
    assert start_worker(hub, CFG).wait().reason is ExitReason.DONE
    # When it is started again without its state
    again = start_worker(hub, CFG, timeouts=OwnerTimeouts(duplicate_s=0.5)).wait()
    # Then it exits with a named reason that says what to do, instead of waiting for ever
    assert again.reason is ExitReason.STATE_MISMATCH and again.reason.exit_code == 3
    assert "applied before" in again.detail and "--checkpoint-dir" in again.detail
    srv.finish()


def test_a_repeated_batch_is_always_answered() -> None:
    # Given an owner that joined and had batch 0 applied
    _, srv, client = joined(CFG)
    client.send(forward(CFG, 0), topology.batch_id("client-0", 0))
    first = wait_for(client.replies, "batch 0's gradient")[0]
    # When it sends batch 0 again (its gradient was lost on its side, say)
    client.send(forward(CFG, 0), topology.batch_id("client-0", 0))
    again = wait_for(client.replies, "an answer to the repeat")[0]
    # Then the first answer was a gradient, and the repeat is answered too: applied before, never silently
    assert isinstance(first, wire.Backward) and first.outcome == "applied" and first.grad is not None
    assert isinstance(again, wire.Backward) and again.outcome == "duplicate"
    assert srv.roles[1].ledger.count("client-0") == 1
    srv.finish()


def test_batches_from_an_owner_that_never_joined_are_not_trained_and_it_is_asked_to_join() -> None:
    hub = StubBroker()
    srv = start_server(hub, CFG, serve_forever=True)
    client = Client(hub, CFG)
    client.send(forward(CFG, 0), topology.batch_id("client-0", 0))
    answer = wait_for(client.replies, "an answer")[0]
    assert isinstance(answer, wire.Backward) and answer.outcome == "rejoin" and "has not joined" in answer.error
    assert srv.roles[1].ledger.count("client-0") == 0 and srv.roles[1].stage.version == 0
    srv.finish()


def test_a_join_with_another_spec_is_refused_with_the_list_of_differences() -> None:
    hub = StubBroker()
    srv = start_server(hub, CFG, serve_forever=True)
    spec = {**owner_spec(CFG), "lr": 0.05, "cut_shape": [320]}
    answer = Client(hub, CFG).hello(spec)
    assert "lr: here 0.03, peer 0.05" in answer.error and "cut_shape" in answer.error
    srv.finish()


def test_a_message_routed_as_one_owner_but_naming_another_is_dead_lettered() -> None:
    hub = StubBroker()
    srv = start_server(hub, CFG, serve_forever=True)
    client = Client(hub, CFG)
    client.hello(owner_spec(CFG))
    client.send(forward(CFG, 0, client="client-9"), "client-9:0")
    wait_for(lambda: dead_letters(hub, CFG.job_id), "the dead letter")
    assert dead_letters(hub, CFG.job_id)[0]["x-splitmq-reason"] == "identity"
    refusal = wait_for(client.replies, "the refusal")[0]
    assert isinstance(refusal, wire.Backward) and refusal.outcome == "refused"
    assert srv.roles[1].stage.version == 0
    srv.finish()


def test_only_the_jobs_owners_take_part_in_averaging_each_as_it_declared() -> None:
    # Given a two-owner averaging job, one owner joined
    cfg = CFG.replace(num_clients=2)
    hub = StubBroker()
    srv = start_server(hub, cfg, serve_forever=True)
    spec = owner_spec(cfg)
    member = Client(hub, cfg, "client-0")
    member.hello(spec, num_samples=800)
    stranger = Client(hub, cfg, "client-7")
    bottom = {name: torch.full(tuple(shape), 0.25) for name, shape in spec["bottom_params"]}

    def weights(sender: Client, samples: int, tensors: dict[str, torch.Tensor]) -> None:
        sender.send(wire.Weights(job_id=cfg.job_id, client_id=sender.name, seq=0, tensors=tensors,
                                 num_samples=samples), topology.request_id(sender.name, "weights", 0))
    # When a stranger, then the member with another sample count, then with other tensors send bottoms
    weights(stranger, 800, bottom)
    weights(member, 5, bottom)
    weights(member, 800, {"x": torch.zeros(2)})
    # Then all three are dead-lettered with their reason, and no round was opened or closed
    reasons = wait_for(lambda: [h["x-splitmq-reason"] for h in dead_letters(hub, cfg.job_id)]
                       if len(dead_letters(hub, cfg.job_id)) == 3 else None, "three dead letters")
    assert reasons == ["not_joined", "membership", "shape"]
    sync = srv.roles[2]
    assert sync.rounds.open == {} and sync.rounds.results == {}
    srv.finish()


def test_one_owner_with_the_default_averaging_never_waits_for_a_round() -> None:
    # Given the defaults (bottom_sync average) and a single owner
    cfg = JobConfig(job_id="stubjob", epochs=2, data="synthetic")
    hub = StubBroker()
    srv = start_server(hub, cfg)
    # When it trains, Then it finishes both epochs and the trainer ends by itself, no round opened
    assert start_worker(hub, cfg).wait().reason is ExitReason.DONE
    assert srv.wait().reason is ExitReason.DONE
    assert srv.roles[2].rounds.results == {}


def test_a_party_waiting_logs_what_for_and_since_when_then_exits_by_name(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Given an owner with no trainer, a short join deadline and frequent wait logs
    monkeypatch.setattr(defaults, "WAIT_LOG_S", 0.2)
    hub = StubBroker()
    caplog.set_level(logging.INFO)
    # When it starts
    outcome = start_worker(hub, CFG, timeouts=OwnerTimeouts(join_s=1.0)).wait()
    # Then it said what it waited for, and ended by name with a hint
    assert outcome.reason is ExitReason.PEER_SILENT and outcome.reason.exit_code == 75
    assert "top's answer to our hello" in outcome.detail and "splitmq server" in outcome.detail
    assert any("waiting for top's answer to our hello since" in r.message for r in caplog.records)


def test_a_party_whose_publishes_the_broker_blocks_waits_on_the_broker_not_its_peer_and_exits_naming_it(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Given an owner with no trainer (a 1 s join deadline), whose broker blocks its publishes (a disk alarm)
    monkeypatch.setattr(defaults, "WAIT_LOG_S", 0.2)
    hub = StubBroker()
    caplog.set_level(logging.INFO)
    stats = Stats()
    roles, loop = worker.build(CFG, worker.WorkerOptions(timeouts=OwnerTimeouts(join_s=1.0)), stats)
    transport = hub.connect("client-0", topology.lease_queue(CFG.job_id, "client-0"))
    transport.blocked_by = "low on disk on a node"
    # When it waits past the join deadline, up to the broker's (3 s)
    outcome = Running(roles, transport, dataclasses.replace(loop, broker_timeout_s=3.0), stats).start().wait()
    # Then it blamed the broker's block, not the silent peer, in its log and its exit
    assert outcome.reason is ExitReason.BROKER_UNAVAILABLE, outcome
    assert "blocks them (low on disk on a node)" in outcome.detail and "rabbitmq-diagnostics alarms" in outcome.detail
    waited = [r.message for r in caplog.records if "waiting for" in r.message]
    assert any("blocks them (low on disk" in m for m in waited) and not any("hello" in m for m in waited), waited


def test_a_wait_for_confirms_while_the_broker_blocks_us_names_the_alarm_and_what_to_do() -> None:
    # Given a party whose replies await the broker's confirms (a checkpoint waits for them)
    hub = StubBroker()
    roles, loop = worker.build(CFG, worker.WorkerOptions(), Stats())
    transport = hub.connect("client-0", topology.lease_queue(CFG.job_id, "client-0"))
    transport.start()
    party = Running(roles, transport, loop, Stats()).party
    plain = party._confirm_wait(5.0)
    # When the broker blocks its publishes (a disk alarm: a reply sent just before is confirmed only after it)
    transport.blocked_by = "low on disk on a node"
    blocked = party._confirm_wait(5.0)
    # Then the wait names the alarm and what to do about it, with the same start, deadline and exit
    assert plain.what == "the broker to confirm our replies" and not plain.hint
    assert blocked.what == "the broker to confirm our replies: it blocks our publishes (low on disk on a node)"
    assert "rabbitmq-diagnostics alarms" in blocked.hint
    assert (blocked.since, blocked.deadline_s, blocked.expire) == (plain.since, plain.deadline_s, plain.expire)


def test_the_roles_clock_stands_still_while_the_broker_is_away() -> None:
    # Given a party whose broker is away from t=2 to t=5
    outages = Outages(timeout_s=900)
    assert outages.waits(None, "", 1.0) == [] and outages.service(1.0) == 1.0
    away = outages.waits("the broker to come back", "", 2.0)
    assert [w.since for w in outages.waits("the broker to come back", "", 4.0)] == [2.0] == [w.since for w in away]
    # Then while it is away the roles' clock stays where the outage began
    assert outages.service(4.5) == 2.0
    # And once it is back it runs again, less the outage: 3 s at t=6, 4 s at t=7
    assert outages.waits(None, "", 5.0) == []
    assert outages.service(6.0) == 3.0 and outages.service(7.0) == 4.0


class _Deadline(Role):
    """A role with deadlines of its own: ``late`` once 5 s passed on its clock since it started,
    and a wait on a peer that ends the party 6 s after it started."""

    name = "deadline"

    def __init__(self) -> None:
        self.began, self.ticks, self.late = 0.0, 0, False

    def inbound(self) -> list[Inbound]:
        return []

    def handle(self, inc: Incoming) -> Step:
        raise AssertionError("nothing comes in")

    def start(self, now: float) -> Step:
        self.began = now
        return Step()

    def tick(self, now: float) -> Step:
        self.late, self.ticks = self.clock() - self.began > 5.0, self.ticks + 1
        return Step()

    def waits(self, now: float) -> list[Wait]:
        return [Wait("the peer's answer", self.began, 6.0)]


def test_a_broker_outage_counts_against_no_deadline_of_a_role() -> None:
    # Given a party on a clock the test moves, with a role whose own deadline is 5 s and whose wait on a peer is 6 s
    hub, t, role = StubBroker(), [0.0], _Deadline()
    transport = hub.connect("top", topology.lease_queue(CFG.job_id, "top"))
    party = Running([role], transport, LoopOptions(name="top", job_id=CFG.job_id), Stats(), clock=lambda: t[0]).start()

    def turns(n: int = 2) -> None:  # the loop went round n more times with what the test set
        seen = role.ticks
        wait_for(lambda: role.ticks >= seen + n, f"{n} more loop turns")

    turns()
    # When the broker blocks our publishes at t=1 and 100 s pass before it takes them again
    t[0] = 1.0
    turns()  # the loop reads t=1 before it sees the block (a turn that read t=0 must not see it)
    transport.blocked_by = "low on disk on a node"
    turns()
    t[0] = 101.0
    turns()
    # Then neither deadline ran meanwhile: the role's clock stood at 1 s
    assert role.clock() == 1.0 and not role.late and party.outcome is None
    transport.blocked_by = None
    turns()
    # And after it, they run on from there: 4 s at t=104, so neither deadline has passed yet
    t[0] = 104.0
    turns()
    assert role.clock() == 4.0 and not role.late and party.outcome is None
    # And they pass on the role's clock: 5.5 s at t=105.5 (its own), 7 s at t=107 (the peer's, ending the party)
    t[0] = 105.5
    turns()
    assert role.late and party.outcome is None
    t[0] = 107.0
    outcome = party.wait()
    assert outcome.reason is ExitReason.PEER_SILENT and "the peer's answer" in outcome.detail, outcome


def test_a_second_party_of_the_same_name_is_refused() -> None:
    hub = StubBroker()
    first = start_server(hub, CFG, serve_forever=True)
    from splitmq.workers import server
    from splitmq.workers.stats import Stats

    from tests.stubs import Running
    roles, loop = server.build(CFG, server.ServerOptions(), Stats())
    loop = loop.__class__(**{**vars(loop), "lease_timeout_s": 0.5})
    second = Running(roles, hub.connect("top", topology.lease_queue(CFG.job_id, "top")), loop, Stats()).start()
    outcome = second.wait()
    assert outcome.reason is ExitReason.NAME_IN_USE and "another party named 'top'" in outcome.detail
    first.finish()


def test_a_redelivered_batch_is_checkpointed_before_the_next_batch_is_taken(tmp_path: Any, monkeypatch: Any) -> None:
    # Given a trainer that checkpoints every 1000 messages (or when idle, or after 5 s), an owner joined,
    # and a batch its consumer took and died holding (the broker redelivers it), with 20 more behind it
    from splitmq.shared import checkpoint
    cfg = dataclasses.replace(CFG, checkpoint_every=1000, epochs=2)
    hub = StubBroker()
    first = start_server(hub, cfg, serve_forever=True, checkpoint_dir=str(tmp_path))
    client = Client(hub, cfg)
    assert client.hello(owner_spec(cfg), batches_per_epoch=21, num_samples=21 * 4).error == ""
    first.finish()
    client.send(forward(cfg, 0), topology.batch_id("client-0", 0))
    dying = hub.connect("dying-trainer")
    taken: list[Any] = []
    dying.consume(topology.forward_queue(cfg.job_id), taken.append)
    dying.close()  # unacked: back at the head of the queue, marked redelivered
    assert len(taken) == 1 and hub.queues[topology.forward_queue(cfg.job_id)].ready[0].redelivered
    for seq in range(1, 21):
        client.send(forward(cfg, seq), topology.batch_id("client-0", seq))
    # When a trainer starts on that queue, its checkpoints watched (how many batches each covers)
    from splitmq.workers import server
    stats = Stats()
    roles, loop = server.build(cfg, server.ServerOptions(serve_forever=True, checkpoint_dir=str(tmp_path)), stats)
    ledger = next(r.ledger for r in roles if r.ledger is not None)
    saves: list[int] = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda path, state: (saves.append(ledger.count("client-0")),
                                                                 real_save(path, state))[-1])
    second = Running(roles, hub.connect("top", topology.lease_queue(cfg.job_id, "top")), loop, stats).start()
    wait_for(lambda: ledger.count("client-0") == 21, "all 21 batches applied")
    # Then the first checkpoint to cover a batch came in the turn that applied the redelivered one, before
    # the next was taken (a trainer killed DELIVERY_LIMIT times before one would have it dead-lettered)
    assert [n for n in saves if n][:1] == [1], saves
    second.finish()
