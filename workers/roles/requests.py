"""The requester's side of serving: a data owner asking the split model for predictions.

``PredictClient`` runs in the owner's ``splitmq predict`` process. Another thread hands it
inputs (``submit``, thread-safe) and gets a ``Future``; on the loop's thread the client runs
its bottom segment, sends a ``predict`` with a request id and a deadline to the first stage,
and resolves the future with the answer: the outputs, or a ``PredictionError`` saying why
(an error that came back as data, no stage serving, or no answer before the deadline). In a
U-shaped job the owner's own head hands its output straight to ``deliver``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import torch

from splitmq.shared import topology, wire
from splitmq.shared.stage import Stage
from splitmq.shared.wire import Served
from splitmq.workers.exits import ExitReason, PartyExit, Wait
from splitmq.workers.roles.base import IfUnroutable, Inbound, Incoming, Role, Send, Source, Step, ToStage
from splitmq.workers.stats import Stats

log = logging.getLogger(__name__)


class PredictionError(Exception):
    """A request that got no prediction: ``reason`` is a ``wire.Served`` value, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class _Pending:
    future: Future[torch.Tensor]
    since: float         # monotonic
    deadline: float      # wall clock, as the request carries it


class PredictClient(Role):
    """Sends the bottom's output of each submitted batch up the chain and matches the answers."""

    name = "predict"

    def __init__(self, bottom: Stage, *, job_id: str, me: str, dest: str, stats: Stats, timeout_s: float,
                 wall: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic) -> None:
        self.bottom, self.job_id, self.me, self.dest, self.stats = bottom, job_id, me, dest, stats
        self.timeout_s, self.wall, self.clock = timeout_s, wall, clock
        self.submitted: queue.Queue[tuple[torch.Tensor, torch.Tensor | None, Future[torch.Tensor]]] = queue.Queue()
        self.pending: dict[str, _Pending] = {}
        self.ready, self.closing = threading.Event(), threading.Event()
        self.nonce = time.time_ns()  # request ids of an earlier process never match ours
        #: Called after each ``submit`` (the loop's ``wake``), so a request is sent at once, not at the next poll.
        self.on_submit: Callable[[], None] = lambda: None
        self.sent = 0

    def submit(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> Future[torch.Tensor]:
        """Ask for the predictions of ``x`` (raw features, this owner's own); any thread may call it."""
        future: Future[torch.Tensor] = Future()
        self.submitted.put((x, sample_ids, future))
        self.on_submit()
        return future

    def close(self) -> None:
        """No more requests: the party ends once every pending one is answered."""
        self.closing.set()

    def fail_all(self, reason: str, detail: str) -> None:
        """The loop ended: nothing pending will be answered any more."""
        for p in self.pending.values():
            if not p.future.done():
                p.future.set_exception(PredictionError(reason, detail))
        self.pending.clear()
        while not self.submitted.empty():
            _, _, future = self.submitted.get_nowait()
            future.set_exception(PredictionError(reason, detail))

    def inbound(self) -> list[Inbound]:
        return [Inbound(topology.answer_queue(self.job_id, self.me), Source.REPLY,
                        frozenset({wire.Kind.PREDICTION}), wire.MAX_MESSAGE_BYTES)]

    def start(self, now: float) -> Step:
        self.ready.set()
        return Step()

    def tick(self, now: float) -> Step:
        step = Step(durable=False)
        while True:
            try:
                x, ids, future = self.submitted.get_nowait()
            except queue.Empty:
                break
            step.sends.append(self._send(x, ids, future, now))
        wall = self.wall()
        for rid, p in list(self.pending.items()):
            if wall > p.deadline:
                self._resolve(rid, Served.TIMEOUT.value, f"no answer from {self.dest} within {self.timeout_s:g}s")
        return step

    def _send(self, x: torch.Tensor, ids: torch.Tensor | None, future: Future[torch.Tensor], now: float) -> Send:
        self.sent += 1
        rid = topology.predict_id(self.me, self.sent) + f"-{self.nonce}"
        deadline = self.wall() + self.timeout_s
        self.pending[rid] = _Pending(future, now, deadline)
        msg = wire.Predict(job_id=self.job_id, client_id=self.me, seq=self.sent, inputs=self.bottom.infer(x),
                           sample_ids=ids, request_id=rid, deadline=deadline)
        return Send(ToStage(topology.serve_address(self.dest)), msg, rid, if_unroutable=IfUnroutable.TELL)

    def handle(self, inc: Incoming) -> Step:
        msg = inc.msg
        assert isinstance(msg, wire.Prediction)
        if msg.reason == Served.OK.value and msg.outputs is None:
            self._resolve(inc.correlation_id, Served.FAILED.value, "an ok answer without outputs")
        else:
            self._resolve(inc.correlation_id, msg.reason, msg.error, msg.outputs)
        return Step(durable=False)

    def deliver(self, request_id: str, outputs: torch.Tensor) -> None:
        """Our own head's output (U-shaped): the prediction never left this process."""
        self._resolve(request_id, Served.OK.value, "", outputs)

    def on_unroutable(self, send: Send, now: float) -> Step:
        self._resolve(send.correlation_id, Served.UNAVAILABLE.value,
                      f"nobody serves {self.dest} now: start `splitmq server --serve` (or --serve-forever) for it")
        return Step()

    def _resolve(self, rid: str, reason: str, detail: str, outputs: torch.Tensor | None = None) -> None:
        p = self.pending.pop(rid, None)
        if p is None:  # a late answer, or one to an earlier process's request
            return
        self.stats.served(reason, self.clock() - p.since)
        if reason == Served.OK.value and outputs is not None:
            p.future.set_result(outputs.clone())
        else:
            p.future.set_exception(PredictionError(reason, detail))

    def waits(self, now: float) -> list[Wait]:
        if not self.pending:
            return []
        since = min(p.since for p in self.pending.values())
        return [Wait(f"{len(self.pending)} prediction(s) from {self.dest}", since, self.timeout_s, expire=None)]

    def finished(self) -> PartyExit | None:
        if self.closing.is_set() and self.submitted.empty() and not self.pending:
            return PartyExit(ExitReason.DONE, f"answered {self.sent} request(s)")
        return None

    def summary(self) -> dict[str, object]:
        p50, p99 = self.stats.quantiles(list(self.stats.inference_seconds))
        return {"requests": self.sent, "latency_p50_s": p50, "latency_p99_s": p99,
                **{k: v for k, v in self.stats.counts.items() if k.startswith("inference_")}}
