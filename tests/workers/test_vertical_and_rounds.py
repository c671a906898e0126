"""Bookkeeping of vertical joins and bottom exchanges, without a broker."""
from __future__ import annotations

import pytest
import torch

from splitmq.shared import wire
from splitmq.shared.errors import RejectedMessage
from splitmq.workers.rounds import BottomRounds
from splitmq.workers.vertical import VerticalJoin, join, split_gradient


def _part(client: str, seq: int, ids: list[int]) -> wire.Forward:
    return wire.Forward(job_id="j", client_id=client, seq=seq, activations=torch.ones(len(ids), 2),
                        sample_ids=torch.tensor(ids))


def test_a_batch_joins_when_every_party_sent_its_part_in_party_order() -> None:
    joiner = VerticalJoin(["client-0", "client-1"], timeout_s=5)
    assert joiner.add(_part("client-1", 0, [1, 2]), "d1") is None
    parts = joiner.add(_part("client-0", 0, [1, 2]), "d0")
    assert parts is not None and [d for _, d in parts] == ["d0", "d1"]
    assert joiner.was_closed(0) == "joined"


def test_parts_with_different_samples_or_from_strangers_are_rejected() -> None:
    joiner = VerticalJoin(["client-0", "client-1"], timeout_s=5)
    joiner.add(_part("client-0", 0, [1, 2]), "d0")
    with pytest.raises(RejectedMessage, match="sample ids differ"):
        joiner.add(_part("client-1", 0, [1, 3]), "d1")
    with pytest.raises(RejectedMessage, match="not a party"):
        joiner.add(_part("mallory", 0, [1, 2]), "dm")


def test_a_batch_missing_a_part_past_the_timeout_is_skipped_with_the_parts_that_came() -> None:
    joiner = VerticalJoin(["client-0", "client-1"], timeout_s=1)
    joiner.add(_part("client-0", 4, [1]), "d0")
    assert joiner.expired(now=0) == []
    (seq, parts), = joiner.expired(now=10**9)
    assert seq == 4 and [d for _, d in parts] == ["d0"] and joiner.was_closed(4) == "skipped"


def test_concatenated_parts_get_back_their_own_gradient_slices() -> None:
    a, b = torch.ones(3, 2), torch.zeros(3, 5)
    joined = join([a, b], "concat")
    grads = split_gradient(torch.arange(21.0).view(3, 7), [2, 5], "concat")
    assert joined.shape == (3, 7) and [g.shape for g in grads] == [(3, 2), (3, 5)]
    assert join([a, a], "sum").shape == (3, 2) and len(split_gradient(a, [2, 2], "sum")) == 2


def test_average_round_answers_everyone_once_all_owners_reported_and_late_ones_after() -> None:
    rounds = BottomRounds(mode="average", num_clients=2, epochs=3)
    first = rounds.contribute(epoch=0, client="client-0", reply_to="client-0", correlation_id="c0",
                              tensors={"w": torch.zeros(1)}, num_samples=1)
    sends = rounds.contribute(epoch=0, client="client-1", reply_to="client-1", correlation_id="c1",
                              tensors={"w": torch.ones(1) * 2}, num_samples=1)
    assert first == [] and {s.client for s in sends} == {"client-0", "client-1"}
    assert all(torch.equal(s.tensors["w"], torch.ones(1)) for s in sends)
    again = rounds.contribute(epoch=0, client="client-0", reply_to="client-0", correlation_id="c0b",
                              tensors={"w": torch.zeros(1)}, num_samples=1)
    assert [s.correlation_id for s in again] == ["c0b"]


def test_hand_off_goes_to_the_next_owner_and_wraps_to_the_next_epoch() -> None:
    rounds = BottomRounds(mode="handoff", num_clients=2, epochs=2)
    w = {"w": torch.ones(1)}
    (to_1,) = rounds.contribute(epoch=0, client="client-0", reply_to="client-0", correlation_id="x", tensors=w,
                                num_samples=1)
    (to_0,) = rounds.contribute(epoch=0, client="client-1", reply_to="client-1", correlation_id="y", tensors=w,
                                num_samples=1)
    assert (to_1.client, to_1.epoch, to_1.correlation_id) == ("client-1", 0, "client-1:handoff:0")
    assert (to_0.client, to_0.epoch) == ("client-0", 1)
    assert rounds.contribute(epoch=1, client="client-1", reply_to="client-1", correlation_id="z", tensors=w,
                             num_samples=1) == []  # nobody trains after the last epoch
