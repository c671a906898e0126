"""``bench.loopphases``: each phase books its own time (less the wrapped calls inside it), per thread,
and the wrapped functions are put back afterwards (the report's table: tests/bench/test_cpu_report.py)."""
from __future__ import annotations

import threading
import types

from splitmq.bench import loopphases
from splitmq.shared import wire


class _Clock:
    """A thread CPU clock that advances only when told: time spent is what the test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_phase_books_its_own_time_less_the_wrapped_calls_it_makes_on_its_own_thread() -> None:
    # Given an outer function that spends 2 s, calls an inner one spending 5 s, then spends 1 s more
    clock = _Clock()
    ledger = loopphases.Ledger(clock)

    def spend(seconds: float) -> None:
        clock.now += seconds

    inner = ledger.wrap(lambda: spend(5.0), "inner")

    def outer_body() -> None:
        spend(2.0)
        inner()
        spend(1.0)

    outer = ledger.wrap(outer_body, "outer")
    # When the outer runs twice on one thread and the inner once more alone, on another thread
    outer()
    outer()
    other = threading.Thread(target=inner, name="other")
    other.start()
    other.join()
    me = threading.current_thread().name
    # Then the outer owns only its own 3 s a call, the inner its 5 s a call, each under its own thread
    assert ledger.own[(me, "outer")] == 6.0 and ledger.own[(me, "inner")] == 10.0
    assert ledger.own[("other", "inner")] == 5.0 and ("other", "outer") not in ledger.own
    assert (ledger.calls[(me, "outer")], ledger.calls[(me, "inner")], ledger.calls[("other", "inner")]) == (2, 2, 1)


def test_a_phase_that_raises_is_still_booked_and_leaves_its_caller_accounted() -> None:
    # Given an inner phase that spends 4 s and then raises, inside an outer one that catches it
    clock = _Clock()
    ledger = loopphases.Ledger(clock)

    def failing() -> None:
        clock.now += 4.0
        raise ValueError("bad batch")

    inner = ledger.wrap(failing, "inner")

    def outer_body() -> None:
        clock.now += 1.0
        try:
            inner()
        except ValueError:
            pass

    ledger.wrap(outer_body, "outer")()
    # Then the failed call counts its 4 s, and the outer keeps only its own second
    me = threading.current_thread().name
    assert ledger.own[(me, "inner")] == 4.0 and ledger.own[(me, "outer")] == 1.0


def test_the_loops_functions_are_wrapped_only_while_the_block_runs() -> None:
    # Given the real phases: a method (Message.encode) and a module function (wire.decode)
    before = (wire.Message.__dict__["encode"], wire.decode)
    ledger = loopphases.Ledger()
    # When a message is encoded and decoded inside the block
    with loopphases.wrapped(ledger):
        assert wire.decode is not before[1]
        msg = wire.Hello(job_id="j", client_id="client-0", seq=0)
        assert wire.decode(msg.encode()) == msg
    # Then both calls were booked on this thread, and the originals are back afterwards
    me = threading.current_thread().name
    assert ledger.calls[(me, "encoding (`Message.encode`)")] == 1
    assert ledger.calls[(me, "decoding (`wire.decode`)")] == 1
    assert (wire.Message.__dict__["encode"], wire.decode) == before


def test_every_phase_names_a_function_that_exists() -> None:
    # Given the phases the bench wraps, when each path is resolved, then each is a function (a rename fails here)
    for module, path, _ in loopphases.PHASES:
        owner, name, function = loopphases.resolve(module, path)
        assert isinstance(function, types.FunctionType) and getattr(owner, name) is function, (module, path)
