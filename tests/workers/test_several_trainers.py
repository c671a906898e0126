"""Several trainers of one job, on the in-memory broker: sharded trainers averaging their top
replicas every round, a standby that takes over, and the refusal of a second plain trainer.

The same cases run with real processes on a real three-node cluster in tests/test_cluster.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from splitmq.shared import checkpoint, topology, wire
from splitmq.shared.config import BottomSync, JobConfig
from splitmq.shared.errors import ConfigError, RejectedMessage
from splitmq.shared.optim import OptimizerSpec
from splitmq.shared.stage import Stage
from splitmq.shared.transport import StubBroker
from splitmq.workers import server
from splitmq.workers.exits import ExitReason
from splitmq.workers.party import LoopOptions
from splitmq.workers.roles.base import Incoming, Send, Source
from splitmq.workers.roles.replicas import Replicas
from splitmq.workers.roles.sync import Outgoing, Rounds
from splitmq.workers.stats import Stats
from tests.stubs import Client, Running, owner_spec, start_worker, wait_for

CFG = JobConfig(job_id="shardjob", epochs=2, data="synthetic", num_clients=4, shards=2)


# ---- the sharding rule and the topology ------------------------------------------------------

def test_owners_are_dealt_out_to_the_trainers_in_turn_and_each_shard_has_its_own_queues() -> None:
    # Given 5 owners over 2 trainers
    # When the rule places them, Then owner i goes to trainer i mod 2, the shards differ by one owner
    assert [topology.shard_of(i, 2) for i in range(5)] == [0, 1, 0, 1, 0]
    assert topology.shard_owners(0, 2, 5) == {0, 2, 4} and topology.shard_owners(1, 2, 5) == {1, 3}
    # And each shard is a stage of its own: its forward queue, its lease; one trainer keeps the plain names
    assert topology.owner_stage("top", 3, 2) == "top-s1"
    assert topology.forward_queue("j", topology.owner_stage("top", 3, 2)) == "splitmq.j.forward.top-s1"
    assert topology.shard_stages("top", 1) == ("top",) and topology.owner_stage("top", 3, 1) == "top"


def test_every_quorum_queue_gets_the_jobs_replica_count() -> None:
    # Given a job's layout, When the job asks for 5 replicas
    layout = topology.with_replicas(topology.job_layout("j", parties=("client-0",)), 5)
    # Then every queue is declared with x-quorum-initial-group-size 5 (the default is 3)
    assert {q.arguments[topology.REPLICAS_ARGUMENT] for q in layout.queues} == {5}
    assert {q.arguments[topology.REPLICAS_ARGUMENT] for q in topology.job_layout("j").queues} == {3}


@pytest.mark.parametrize("changes, field", [
    ({"bottom_sync": BottomSync.INDEPENDENT}, "bottom_sync = average"),
    ({"num_clients": 1}, "num_clients"),
    ({"shards": 0}, "shards must be >= 1"),
])
def test_a_sharded_job_without_averaged_bottoms_or_owners_for_every_trainer_is_refused(
        changes: dict[str, Any], field: str) -> None:
    # Given a sharded job, When a setting makes sharding meaningless, Then the refusal names what to change
    with pytest.raises(ConfigError, match=field):
        CFG.replace(**changes)


def test_a_trainer_of_a_sharded_job_must_say_which_shard_it_is() -> None:
    # Given a job with two trainers, When a server starts without --shard, or with one out of range
    # Then it is refused, naming the range
    for shard in (None, 2):
        with pytest.raises(ValueError, match="--shard 0..1"):
            server.party_name(CFG, "top", shard)
    # And a job with one trainer refuses a shard
    with pytest.raises(ValueError, match="one trainer"):
        server.party_name(CFG.replace(shards=1), "top", 1)


# ---- the averaging between trainers ------------------------------------------------------------

def tiny_stage(value: float) -> Stage:
    segment = torch.nn.Linear(2, 1)
    with torch.no_grad():
        for p in segment.parameters():
            p.fill_(value)
    return Stage(segment, optimizer=OptimizerSpec("SGD", 0.1))


class Trainers:
    """Two (or three) Replicas roles wired to each other by hand, with a clock the test moves.

    Every top starts the round at 0.0; trainer k's training moved every weight of its top to ``moved[k]``.
    """

    def __init__(self, moved: list[float], timeout_s: float = 60.0) -> None:
        self.now = 0.0
        names = tuple(f"top-s{k}" for k in range(len(moved)))
        self.stages = [tiny_stage(0.0) for _ in moved]
        self.rounds = [Rounds(timeout_s=timeout_s) for _ in moved]
        clock: Callable[[], float] = lambda: self.now
        self.roles = [Replicas(s, r, me=n, trainers=names, job_id="j", reply_queue=topology.reply_queue("j", n),
                               timeout_s=timeout_s, clock=clock)
                      for s, r, n in zip(self.stages, self.rounds, names)]
        for stage, value in zip(self.stages, moved):
            with torch.no_grad():
                for param in stage.segment.parameters():
                    param.fill_(value)

    def close_round(self, k: int, bottom: float, samples: int, owner: str = "client-0") -> list[Send]:
        out = Outgoing(owner, topology.request_id(owner, "weights", 0), 0, {"w": torch.full((2,), bottom)})
        return self.roles[k].closed(0, samples, [out])

    def deliver(self, send: Send) -> list[Send]:
        """Hand a part to the trainer it is addressed to; what that trainer sends in turn."""
        role = next(r for r in self.roles if r.me == getattr(send.route, "party", ""))
        assert isinstance(send.msg, wire.Weights)
        inc = Incoming(msg=wire.decode(send.msg.encode()), source=Source.REPLY, queue=role.reply_queue, sender="",
                       reply_to=send.msg.client_id, correlation_id=send.correlation_id)
        return role.handle(inc).sends


def test_two_trainers_end_a_round_with_the_same_merged_top_and_the_bottoms_sample_weighted_average() -> None:
    # Given two trainers whose tops moved from 0.0 to 1.0 and to 3.0 in the round, shards of 100 and 300 samples
    t = Trainers([1.0, 3.0])
    # When each closes its shard's round (bottom averages 0.0 and 4.0) and receives the other's part
    first = t.close_round(0, 0.0, 100)
    second = t.close_round(1, 4.0, 300)
    answers = t.deliver(first[0]) + t.deliver(second[0])
    # Then both tops are the start plus both changes (4.0: what one trainer applying both in turn
    # would reach), and each owner gets the 1:3-weighted bottom (3.0)
    for stage in t.stages:
        assert all(torch.allclose(p, torch.full_like(p, 4.0)) for p in stage.segment.parameters())
    bottoms = [a.msg.tensors["w"] for a in answers]  # type: ignore[attr-defined]
    assert len(bottoms) == 2 and all(torch.allclose(b, torch.full((2,), 3.0)) for b in bottoms)
    # And a late owner of either shard gets the trainers' average, not its shard's
    assert torch.allclose(t.rounds[0].results[0]["w"], torch.full((2,), 3.0))


def test_a_part_that_comes_before_our_own_round_closed_is_kept_for_it() -> None:
    # Given trainer 1 is ahead: its part reaches trainer 0 before trainer 0's shard round closed
    t = Trainers([1.0, 3.0])
    early = t.close_round(1, 4.0, 100)
    assert t.deliver(early[0]) == []
    # When trainer 0's round closes, Then the average is done at once, with both parts
    answers = t.close_round(0, 0.0, 100)
    owner_answers = [s for s in answers if s.route.party == "client-0"]  # type: ignore[union-attr]
    assert len(owner_answers) == 1 and torch.allclose(owner_answers[0].msg.tensors["w"],  # type: ignore[attr-defined]
                                                      torch.full((2,), 2.0))


def test_a_round_closes_without_an_absent_trainer_after_the_timeout_and_its_late_part_is_dropped() -> None:
    # Given three trainers, one of which (top-s2) never sends its part
    t = Trainers([1.0, 3.0, 5.0], timeout_s=10.0)
    parts0, parts1 = t.close_round(0, 0.0, 100), t.close_round(1, 4.0, 100)
    for send in (parts0 + parts1):
        if send.route.party != "top-s2":  # type: ignore[union-attr]
            t.deliver(send)
    assert t.roles[0].waits(t.now)[0].what == "the parts of trainer(s) ['top-s2'] for the epoch-0 average"
    # When the timeout passes, Then the round closes with the two that came
    t.now = 11.0
    step = t.roles[0].tick(t.now)
    bottom = step.sends[0].msg.tensors["w"]  # type: ignore[attr-defined]
    assert step.checkpoint and torch.allclose(bottom, torch.full((2,), 2.0))
    assert all(torch.allclose(p, torch.full_like(p, 4.0)) for p in t.stages[0].segment.parameters())
    # And the absent trainer's part, arriving late, is dropped without changing anything
    late = t.close_round(2, 8.0, 100)
    assert t.deliver(next(s for s in late if s.route.party == "top-s0")) == []  # type: ignore[union-attr]
    assert all(torch.allclose(p, torch.full_like(p, 4.0)) for p in t.stages[0].segment.parameters())


def test_trainers_out_of_step_after_a_round_one_missed_compute_the_same_top_in_the_next() -> None:
    # Given two trainers whose tops differ at the start of a round (one missed the last merge)
    t = Trainers([1.0, 3.0])
    t.roles[1].base = {k: torch.full_like(v, 0.5) for k, v in t.roles[1].base.items()}
    # When both parts are exchanged
    first, second = t.close_round(0, 0.0, 100), t.close_round(1, 4.0, 100)
    t.deliver(first[0])
    t.deliver(second[0])
    # Then both adopt the same top: the mean of the starting tops plus both changes (0.25 + 1.0 + 2.5)
    tops = [dict(stage.segment.state_dict()) for stage in t.stages]
    assert all(torch.equal(tops[0][k], tops[1][k]) for k in tops[0])
    assert all(torch.allclose(v, torch.full_like(v, 3.75)) for v in tops[0].values())


def test_a_part_from_someone_who_is_not_another_trainer_is_refused() -> None:
    # Given two trainers, When trainer 0 receives a part that says it is from client-0 (or from itself)
    t = Trainers([1.0, 3.0])
    part = t.close_round(1, 4.0, 100)[0]
    for impostor in ("client-0", "top-s0"):
        msg = part.msg.copy(client_id=impostor)  # type: ignore[attr-defined]
        inc = Incoming(msg=msg, source=Source.REPLY, queue="q", sender="", reply_to=impostor, correlation_id="c")
        # Then it is refused as an identity problem
        with pytest.raises(RejectedMessage, match="not another trainer"):
            t.roles[0].handle(inc)


def test_an_open_round_survives_a_restart_in_the_checkpoint(tmp_path: Path) -> None:
    # Given trainer 0 with its round closed and waiting for trainer 1, checkpointed
    t = Trainers([1.0, 3.0])
    t.close_round(0, 0.0, 100)
    checkpoint.save(tmp_path / "c.pt", {"replicas": t.roles[0].state()})
    # When a fresh trainer 0 loads it and then gets trainer 1's part
    fresh = Trainers([1.0, 3.0])
    saved = checkpoint.load(tmp_path / "c.pt")
    assert saved is not None
    fresh.roles[0].load_state(saved["replicas"])
    answers = fresh.deliver(t.close_round(1, 4.0, 100)[0])
    # Then the round completes and its owner gets the average
    assert [a.route.party for a in answers] == ["client-0"]  # type: ignore[union-attr]


# ---- sharded training end to end on the stub ------------------------------------------------------

def start_shard(hub: StubBroker, cfg: JobConfig, shard: int) -> Running:
    stats = Stats()
    roles, loop = server.build(cfg, server.ServerOptions(shard=shard), stats)
    running = Running(roles, hub.connect(loop.name, topology.lease_queue(cfg.job_id, loop.name)), loop,
                      stats).start()
    queue = topology.forward_queue(cfg.job_id, loop.name)
    wait_for(lambda: hub.queues.get(queue) is not None and hub.queues[queue].consumers, f"{loop.name} to consume")
    return running


def test_four_owners_over_two_trainers_finish_with_every_top_and_bottom_equal() -> None:
    # Given a job of four owners over two trainers (owners 0, 2 on top-s0; 1, 3 on top-s1)
    hub = StubBroker()
    trainers = [start_shard(hub, CFG, k) for k in (0, 1)]
    # When the owners train their two epochs
    owners = [start_worker(hub, CFG, i) for i in range(4)]
    # Then every party finishes, each trainer with only its own owners' batches
    assert [o.wait().reason for o in owners] == [ExitReason.DONE] * 4
    assert [t.wait().reason for t in trainers] == [ExitReason.DONE] * 2
    ledgers = [t.roles[1].ledger for t in trainers]
    assert sorted(ledgers[0].state()) == ["client-0", "client-2"] and sorted(ledgers[1].state()) == ["client-1",
                                                                                                       "client-3"]
    # And both rounds were merged between the trainers, leaving the same top on both
    assert [t.roles[-1].summary()["rounds_averaged"] for t in trainers] == [2, 2]
    tops = [t.roles[1].stage.segment.state_dict() for t in trainers]
    assert all(torch.equal(tops[0][k], tops[1][k]) for k in tops[0])
    # And every owner ended with the same bottom (the last average)
    bottoms = [o.roles[0].stage.segment.state_dict() for o in owners]
    assert all(torch.equal(b[k], bottoms[0][k]) for b in bottoms for k in b)


def test_an_owner_sent_to_another_trainers_shard_is_refused_naming_the_owners_it_serves() -> None:
    # Given trainer top-s0, which serves owners 0 and 2
    hub = StubBroker()
    trainer = start_shard(hub, CFG, 0)
    # When owner 1 (top-s1's) says hello to top-s0
    client = Client(hub, CFG.replace(stages=("top-s0",)), "client-1")
    answer = client.hello(owner_spec(CFG), client_index=1)
    # Then the join is refused, and the refusal says which owners that trainer serves
    assert "owner 1 is not served here" in answer.error and "[0, 2]" in answer.error
    trainer.finish()


# ---- standby -----------------------------------------------------------------------------------

def test_a_standby_waits_while_the_active_trainer_runs_and_resumes_from_what_it_wrote_last(
        tmp_path: Path) -> None:
    # Given an active trainer checkpointing to a directory, and a standby on the same directory
    cfg = JobConfig(job_id="standby", epochs=1, data="synthetic")
    hub = StubBroker()
    active = server.build(cfg, server.ServerOptions(checkpoint_dir=str(tmp_path), serve_forever=True), Stats())
    first = Running(active[0], hub.connect("top", topology.lease_queue(cfg.job_id, "top")), active[1],
                    Stats()).start()
    wait_for(lambda: first.transport.connected, "the active trainer to connect")
    roles, loop = server.build(cfg, server.ServerOptions(checkpoint_dir=str(tmp_path), serve_forever=True,
                                                         standby=True), Stats())
    assert isinstance(loop, LoopOptions) and loop.standby and "--standby" in loop.in_use_hint
    standby = Running(roles, hub.connect("top", topology.lease_queue(cfg.job_id, "top")), loop, Stats()).start()
    # When the active one trains an owner to the end and stops (writing its last checkpoint)
    assert start_worker(hub, cfg).wait().reason is ExitReason.DONE
    first.finish()
    written = {k: v.clone() for k, v in first.roles[1].stage.segment.state_dict().items()}
    # Then the standby takes over with the top the active one wrote last, not the one there when it started
    wait_for(lambda: standby.transport.connected, "the standby to take over")
    # (waited on, not read once: the loop restores the ledger, then the top, on its own thread)
    def restored() -> bool:
        top = standby.roles[1].stage.segment.state_dict()
        return standby.roles[1].ledger.count("client-0") > 0 and all(torch.equal(top[k], written[k]) for k in top)
    wait_for(restored, "the standby to restore the ledger and the top the active one wrote last")
    standby.finish()


def replayed(cfg: JobConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The job of one owner per trainer computed in this process, step by step: each trainer trains
    on its owner's batches in order, then the tops are merged and the bottoms averaged every epoch."""
    from splitmq.shared import aggregate, data
    from splitmq.workers import assemble
    from splitmq.workers.roles.replicas import merged_top
    owners = [assemble.owner_data(cfg, i) for i in range(cfg.num_clients)]
    bottoms = [assemble.bottom_stage(cfg, i, len(o.train), "cpu") for i, o in enumerate(owners)]
    per = data.batches_per_epoch(len(owners[0].train), cfg.batch_size)
    tops = [assemble.server_stage(cfg, 1, last=True, total_steps=lambda: cfg.epochs * per, device="cpu")
            for _ in range(cfg.shards)]
    for epoch in range(cfg.epochs):
        bases = [{k: v.clone() for k, v in t.segment.state_dict().items()} for t in tops]
        for i, owner in enumerate(owners):  # trainer i serves owner i alone: the order between them is moot
            for step, ids in enumerate(data.batch_order(len(owner.train), cfg.batch_size, cfg.seed + i, epoch)):
                batch = owner.train.batch(ids)
                out = tops[topology.shard_of(i, cfg.shards)].loss_step(bottoms[i].forward((epoch, step), batch.x),
                                                                        batch.y)
                bottoms[i].backward((epoch, step), out.grad_input)
        top = merged_top(bases, [t.segment.state_dict() for t in tops])
        bottom = aggregate.weighted_average([b.segment.state_dict() for b in bottoms], [len(o.train) for o in owners])
        for t in tops:
            t.segment.load_state_dict(top)
        for b in bottoms:
            b.segment.load_state_dict(bottom)
    return tops[0].segment.state_dict(), bottoms[0].segment.state_dict()


def test_sharded_training_is_exactly_the_merge_of_each_trainers_own_training() -> None:
    # Given two owners over two trainers, one owner each, so that no arrival order can change the result
    cfg = JobConfig(job_id="shardexact", epochs=3, data="synthetic", num_clients=2, shards=2)
    hub = StubBroker()
    trainers = [start_shard(hub, cfg, k) for k in (0, 1)]
    # When they train through the loop, the broker and the replicas' rounds
    owners = [start_worker(hub, cfg, i) for i in range(2)]
    assert [o.wait().reason for o in owners] == [ExitReason.DONE] * 2
    assert [t.wait().reason for t in trainers] == [ExitReason.DONE] * 2
    # Then the top and the bottoms are what the algorithm computes in one process (the merge sums in
    # float64, so equal to float32 rounding): the sharded job adds nothing and drops nothing
    top, bottom = replayed(cfg)
    for got, want in ((trainers[0].roles[1].stage.segment.state_dict(), top),
                      (trainers[1].roles[1].stage.segment.state_dict(), top),
                      (owners[0].roles[0].stage.segment.state_dict(), bottom)):
        assert got.keys() == want.keys()
        assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want), \
            max(float((got[k] - want[k]).abs().max()) for k in want)
