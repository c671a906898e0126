"""Which broker address comes next (``shared.rotation``): every one once a round, the lost one last."""
from __future__ import annotations

import pytest

from splitmq.shared.rotation import Rotation


def test_each_round_tries_every_address_once_and_the_node_just_lost_last() -> None:
    nodes = Rotation(["a", "b", "c"])
    first = [nodes.next() for _ in range(3)]
    assert sorted(first) == ["a", "b", "c"] and nodes.peek() is None
    # When we served through one node and lost it
    nodes.ready()
    lost = nodes.current
    nodes.lost()
    # Then the next round tries the two others first
    again = [nodes.next() for _ in range(3)]
    assert sorted(again) == ["a", "b", "c"] and again[-1] == lost


def test_a_login_refusal_is_final_only_once_every_address_refused_since_we_were_ready() -> None:
    nodes = Rotation(["a", "b"])
    nodes.next()
    assert nodes.login_refused() is False   # the other node may still accept us
    nodes.next()
    nodes.ready()                            # it did: refusals count afresh
    nodes.next()
    assert nodes.login_refused() is False
    nodes.next()
    assert nodes.login_refused() is True


def test_no_address_is_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="at least one broker address"):
        Rotation([])
