"""The applied-batch record behind exactly-once: a prefix plus what was applied above it."""
from __future__ import annotations

from splitmq.shared.ledger import MAX_SEQ_JUMP, Ledger


def test_a_batch_applied_out_of_order_leaves_the_earlier_one_unapplied_until_it_comes() -> None:
    # Given batches 0, 1 and 3 of a client applied (2 is being retried)
    ledger = Ledger()
    for seq in (0, 1, 3):
        ledger.add("c", seq)
    # Then 2 is not taken for a repeat, and the prefix stops before it
    assert not ledger.applied("c", 2) and ledger.applied("c", 3) and ledger.prefix("c") == 1
    assert ledger.above("c") == [3] and ledger.count("c") == 3
    # When 2 is applied, the prefix closes over 3
    ledger.add("c", 2)
    assert ledger.prefix("c") == 3 and ledger.above("c") == [] and ledger.count("c") == 4


def test_unapplied_batches_skip_those_applied_above_the_prefix() -> None:
    ledger = Ledger()
    for seq in (0, 2, 3):
        ledger.add("c", seq)
    it = ledger.unapplied("c")
    assert [next(it) for _ in range(3)] == [1, 4, 5]


def test_clients_are_kept_apart_and_the_record_survives_a_checkpoint() -> None:
    ledger = Ledger()
    ledger.add("a", 0)
    ledger.add("b", 5)
    copy = Ledger()
    copy.load_state(ledger.state())
    assert copy.applied("a", 0) and not copy.applied("a", 5) and copy.applied("b", 5) and not copy.applied("b", 0)
    assert copy.prefix("b") == -1 and copy.above("b") == [5]


def test_a_wild_jump_or_a_negative_batch_number_is_implausible() -> None:
    ledger = Ledger()
    ledger.add("c", 10)
    assert ledger.plausible("c", 11) and not ledger.plausible("c", -1)
    assert not ledger.plausible("c", MAX_SEQ_JUMP + 1)
