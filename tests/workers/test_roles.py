"""Roles tested directly, as Flower's strategies are: a message in, a Step out. No loop, no broker."""
from __future__ import annotations

import torch

from splitmq.shared import topology, wire
from splitmq.shared.config import Combine, JobConfig
from splitmq.workers import assemble
from splitmq.workers.roles.base import Incoming, Source, ToParty
from splitmq.workers.roles.members import Members
from splitmq.workers.roles.sync import Average, Handoff, Independent, Rounds, next_turn, owner_policy
from splitmq.workers.roles.top import Labels
from splitmq.workers.roles.vertical import VerticalTopRole, join, split_gradient
from splitmq.workers.stats import Stats
from splitmq.shared.config import BottomSync


def _part(client: str, seq: int, ids: list[int], width: int = 2) -> Incoming:
    msg = wire.Forward(job_id="j", client_id=client, seq=seq, activations=torch.ones(len(ids), width),
                       sample_ids=torch.tensor(ids))
    return Incoming(msg, Source.FORWARD, "q", client, client, topology.batch_id(client, seq))


def _vertical(timeout: float = 5.0) -> VerticalTopRole:
    cfg = JobConfig(job_id="j", vertical_parts=2, bottom_sync=BottomSync.INDEPENDENT, label_source="top",
                    data="synthetic")
    members = Members(num_clients=2, epochs=1, spec={}, compare_bottoms=False, compare_models=False)
    for i in range(2):
        members.join(f"client-{i}", {"cut_shape": [2]}, {"client_index": i})
    stage = assemble.server_stage(cfg, 1, last=True, total_steps=lambda: 10, device="cpu")
    stage.segment = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LogSoftmax(dim=1))
    stage.optimizer = torch.optim.SGD(stage.segment.parameters(), lr=0.1)
    stage._base_lrs = [0.1]
    labels = Labels(values=torch.arange(10) % 3, ids=torch.arange(10))
    return VerticalTopRole(stage, members=members, stats=Stats(), job_id="j", forward_queue="q", parties=2,
                           combine=Combine.CONCAT, labels=labels, task="classification", batch_size=8,
                           timeout_s=timeout)


def test_a_vertical_batch_is_trained_when_every_party_sent_its_part_and_each_gets_its_slice() -> None:
    role = _vertical()
    first = role.handle(_part("client-1", 0, [1, 2]))
    assert first.hold is not None and first.sends == []
    step = role.handle(_part("client-0", 0, [1, 2]))
    assert sorted(step.applied) == [("client-0", 0), ("client-1", 0)] and step.settle == [first.hold]
    answers = {s.route.party: s.msg for s in step.sends if isinstance(s.route, ToParty)}
    assert set(answers) == {"client-0", "client-1"}
    assert all(isinstance(m, wire.Backward) and m.grad is not None and m.grad.shape == (2, 2) for m in answers.values())


def test_vertical_parts_with_different_samples_are_rejected() -> None:
    import pytest

    from splitmq.shared.errors import RejectedMessage
    role = _vertical()
    role.handle(_part("client-0", 0, [1, 2]))
    with pytest.raises(RejectedMessage, match="sample ids differ"):
        role.handle(_part("client-1", 0, [1, 3]))
    with pytest.raises(RejectedMessage, match="has not joined"):
        role.handle(_part("mallory", 0, [1, 2]))


def test_a_vertical_batch_missing_a_part_past_the_timeout_is_skipped_and_late_parts_hear_so() -> None:
    role = _vertical(timeout=1.0)
    held = role.handle(_part("client-0", 4, [1])).hold
    assert role.tick(now=role.pending[(True, 0, 4)].first_seen + 0.5).sends == []
    step = role.tick(now=10**9)
    assert step.settle == [held] and step.applied == [("client-0", 4)]
    assert [s.msg.outcome for s in step.sends] == ["skipped"]  # type: ignore[union-attr]
    late = role.handle(_part("client-1", 4, [1]))
    assert [s.msg.outcome for s in late.sends] == ["skipped"] and late.applied == [("client-1", 4)]  # type: ignore[union-attr]


def test_concatenated_parts_get_back_their_own_gradient_slices() -> None:
    a, b = torch.ones(3, 2), torch.zeros(3, 5)
    assert join([a, b], Combine.CONCAT).shape == (3, 7)
    grads = split_gradient(torch.arange(21.0).view(3, 7), [2, 5], Combine.CONCAT)
    assert [g.shape for g in grads] == [(3, 2), (3, 5)]
    assert join([a, a], Combine.SUM).shape == (3, 2) and len(split_gradient(a, [2, 2], Combine.SUM)) == 2


def test_an_average_round_answers_every_owner_once_all_reported_and_a_late_one_after() -> None:
    rounds = Rounds(timeout_s=60)
    first = rounds.contribute(epoch=0, index=0, client="a", correlation_id="c0", tensors={"w": torch.zeros(1)},
                              num_samples=1, expected={0, 1}, now=0.0)
    sends = rounds.contribute(epoch=0, index=1, client="b", correlation_id="c1", tensors={"w": torch.ones(1) * 2},
                              num_samples=1, expected={0, 1}, now=0.0)
    assert first == [] and {s.client for s in sends} == {"a", "b"}
    assert all(torch.equal(s.tensors["w"], torch.ones(1)) for s in sends)
    again = rounds.contribute(epoch=0, index=0, client="a", correlation_id="c0b", tensors={"w": torch.zeros(1)},
                              num_samples=1, expected={0, 1}, now=0.0)
    assert [s.correlation_id for s in again] == ["c0b"]


def test_a_round_waits_for_the_expected_owners_until_its_timeout() -> None:
    rounds = Rounds(timeout_s=10)
    rounds.contribute(epoch=0, index=0, client="a", correlation_id="c0", tensors={"w": torch.ones(1)},
                      num_samples=3, expected={0, 1}, now=0.0)
    assert rounds.overdue(5.0) == [] and rounds.overdue(11.0) == [0] and rounds.missing(0, {0, 1}) == [1]
    (only,) = rounds.close(0)
    assert only.client == "a" and torch.equal(only.tensors["w"], torch.ones(1))


def test_turns_go_to_the_next_owner_and_wrap_to_the_next_epoch() -> None:
    assert next_turn(epoch=0, index=0, num_clients=2, epochs=2) == (1, 0)
    assert next_turn(epoch=0, index=1, num_clients=2, epochs=2) == (0, 1)
    assert next_turn(epoch=1, index=1, num_clients=2, epochs=2) is None


def test_owner_policies_follow_the_mode_and_a_single_owner_never_syncs() -> None:
    assert isinstance(owner_policy(BottomSync.AVERAGE, num_clients=1, index=0, sync_every=1), Independent)
    avg = owner_policy(BottomSync.AVERAGE, num_clients=2, index=1, sync_every=2)
    assert isinstance(avg, Average) and not avg.shares_after(0) and avg.shares_after(1) and avg.waits_for_average(1)
    turn = owner_policy(BottomSync.HANDOFF, num_clients=2, index=0, sync_every=1)
    assert isinstance(turn, Handoff) and not turn.waits_for_turn(0) and turn.waits_for_turn(1)
