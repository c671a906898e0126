"""The answers a transient job's trainer keeps, to send again (``delivery = transient``).

A broker restart loses what a transient job's queues held: batches and their answers. The
owner sends a batch again when it stays unanswered (``TRANSIENT_RESEND_AFTER_S``); if the
trainer had applied it, the loop answers with what it answered then (the same gradient,
``applied``), where a durable job answers ``duplicate`` (its answer is safe in the owner's
queue). The owner applies the first answer of a batch and drops any later one. An owner has at
most ``max_in_flight`` batches unanswered, all among its newest, so the answers of its
``ANSWERS_KEPT`` newest applied batches cover every batch it can send again; older ones are
forgotten. Kept in memory only: a trainer that crashes while the broker restarts can lose an
answer, and its owner then exits ``state_mismatch``, naming the batch (docs/guarantees.md).
"""
from __future__ import annotations

import heapq

from splitmq.shared import defaults, wire
from splitmq.workers.roles.base import Send, Step


class Answers:
    """Each owner's newest ``kept`` applied batches' answers, by ``seq``."""

    def __init__(self, kept: int = defaults.ANSWERS_KEPT) -> None:
        self.kept = kept
        self._of: dict[str, dict[int, Send]] = {}
        self._seqs: dict[str, list[int]] = {}  # per owner, the kept seqs as a heap: the oldest leaves first

    def keep(self, step: Step) -> None:
        """Keep the ``applied`` answers ``step`` sends for the batches it applies."""
        applied = set(step.applied)
        for send in step.sends:
            msg = send.msg
            if isinstance(msg, wire.Backward) and msg.outcome == wire.Outcome.APPLIED.value \
                    and (msg.client_id, msg.seq) in applied:
                answers = self._of.setdefault(msg.client_id, {})
                if msg.seq not in answers:
                    heapq.heappush(self._seqs.setdefault(msg.client_id, []), msg.seq)
                answers[msg.seq] = send
                if len(answers) > self.kept:
                    del answers[heapq.heappop(self._seqs[msg.client_id])]

    def get(self, client: str, seq: int) -> wire.Backward | None:
        """The answer sent for batch ``seq`` of ``client``, if still kept."""
        send = self._of.get(client, {}).get(seq)
        return send.msg if send is not None and isinstance(send.msg, wire.Backward) else None

    def __len__(self) -> int:
        return sum(len(a) for a in self._of.values())
