"""What a party counts, for its Prometheus metrics and its summary, in one place.

The loop reports transport facts (bytes, repeats, rejections); roles report model facts
(a batch applied with its loss, an evaluation's scores). Roles never touch prometheus:
they call these methods, and a ``Stats`` without ``Metrics`` (unit tests) only counts.
"""
from __future__ import annotations

import collections
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from splitmq.shared.metrics import Metrics


class Stats:
    """Counters and recent values of one party."""

    def __init__(self, metrics: Metrics | None = None, *, history_path: Path | None = None, party: str = "") -> None:
        self.metrics = metrics
        self.history_path, self.party = history_path, party
        self.tty = sys.stderr.isatty()
        self._drawn, self._width = 0.0, 0
        if history_path is not None:
            history_path.parent.mkdir(parents=True, exist_ok=True)
        self.counts: collections.Counter[str] = collections.Counter()
        self.rejections: collections.Counter[str] = collections.Counter()
        self.last_loss: float | None = None
        self.round_trips: list[float] = []
        self.step_seconds: list[float] = []
        self.inference_seconds: collections.deque[float] = collections.deque(maxlen=100_000)  # recent only

    def _m(self) -> Metrics | None:
        return self.metrics

    def received(self, nbytes: int) -> None:
        self.counts["bytes_received"] += nbytes
        self.counts["messages_received"] += 1
        if (m := self._m()) is not None:
            m.bytes.labels(m.role, "received").inc(nbytes)

    def sent(self, nbytes: int, *, cut_samples: int = 0) -> None:
        """One message body sent; ``cut_samples`` > 0 when it carried that many training samples'
        activations or gradients (what ``cut_bytes_per_sample`` divides by)."""
        self.counts["bytes_sent"] += nbytes
        self.counts["messages_sent"] += 1
        if cut_samples:
            self.counts["cut_bytes_sent"] += nbytes
            self.counts["cut_samples_sent"] += cut_samples
        if (m := self._m()) is not None:
            m.bytes.labels(m.role, "sent").inc(nbytes)
            if cut_samples:
                m.cut_bytes_per_sample.labels(m.role).set(self.cut_bytes_per_sample())

    def cut_bytes_per_sample(self) -> float:
        """Body bytes this party sent per training sample in its activations or gradient messages
        (envelope, labels and ids included; 0.0 before the first)."""
        samples = self.counts["cut_samples_sent"]
        return self.counts["cut_bytes_sent"] / samples if samples else 0.0

    def totals(self) -> dict[str, Any]:
        """What this party did, for its summary."""
        c = self.counts
        return {"batches_applied": c["applied"], "samples": c["samples"], "duplicates": c["duplicates"],
                "skipped": c["skipped"], "rejected": dict(self.rejections), "bytes_sent": c["bytes_sent"],
                "bytes_received": c["bytes_received"], "cut_bytes_per_sample": self.cut_bytes_per_sample(),
                "messages_sent": c["messages_sent"], "messages_received": c["messages_received"]}

    def duplicate(self) -> None:
        self.counts["duplicates"] += 1
        if (m := self._m()) is not None:
            m.batches.labels(m.role, "duplicate").inc()

    def rejected(self, reason: str) -> None:
        self.rejections[reason] += 1
        if (m := self._m()) is not None:
            m.reject(reason)

    def skipped(self, reason: str) -> None:
        self.counts["skipped"] += 1
        if (m := self._m()) is not None:
            m.skipped.labels(m.role, reason).inc()
            m.batches.labels(m.role, "skipped").inc()

    def applied(self, samples: int, *, loss: float | None = None, staleness: int | None = None,
                round_trip_s: float | None = None, step_s: float | None = None) -> None:
        """One training batch's update is in the segment."""
        self.counts["applied"] += 1
        self.counts["samples"] += samples
        if loss is not None and math.isfinite(loss):
            self.last_loss = loss
        if round_trip_s is not None:
            self.round_trips.append(round_trip_s)
        if step_s is not None:
            self.step_seconds.append(step_s)
        m = self._m()
        if m is None:
            return
        m.batches.labels(m.role, "applied").inc()
        m.samples.labels(m.role).inc(samples)
        m.last_progress.labels(m.role).set(time.time())
        if loss is not None and math.isfinite(loss):
            m.loss.labels(m.role).set(loss)
        if staleness is not None:
            m.staleness.labels(m.role).observe(staleness)
        if round_trip_s is not None:
            m.round_trip.labels(m.role).observe(round_trip_s)
        if step_s is not None:
            m.step_time.labels(m.role).observe(step_s)

    def evaluated(self, scores: Mapping[str, float]) -> None:
        """An evaluation pass finished with these task metrics (accuracy, roc_auc, mae, ...)."""
        self.counts["evaluations"] += 1
        if (m := self._m()) is not None:
            m.batches.labels(m.role, "evaluated").inc()
            for name, value in scores.items():
                m.task_metric(name, value)

    def gauge(self, name: str, value: float) -> None:
        """``epoch``, ``in_flight``, ``clients`` or ``dcor`` (NoPeek's distance correlation)."""
        if (m := self._m()) is None:
            return
        {"epoch": m.epoch, "in_flight": m.in_flight, "clients": m.clients,
         "dcor": m.cut_dcor}[name].labels(m.role).set(value)

    def finished(self) -> None:
        """This party has ended its part of the job cleanly."""
        if (m := self._m()) is not None:
            m.finished.labels(m.role).set(1)

    def reconnected(self) -> None:
        if (m := self._m()) is not None:
            m.reconnects.labels(m.role).inc()

    def loss(self, value: float) -> None:
        """A loss this party computed but does not count as its own applied batch (a U-shaped head)."""
        if math.isfinite(value):
            self.last_loss = value
            if (m := self._m()) is not None:
                m.loss.labels(m.role).set(value)

    def served(self, outcome: str, seconds: float | None = None) -> None:
        """One inference request ended with ``outcome`` (a ``wire.Served`` value) after ``seconds``."""
        self.counts[f"inference_{outcome}"] += 1
        if seconds is not None:
            self.inference_seconds.append(seconds)
        if (m := self._m()) is not None:
            m.inference_requests.labels(m.role, outcome).inc()
            if seconds is not None:
                m.inference_latency.labels(m.role).observe(seconds)

    def history(self, **fields: Any) -> None:
        """Append one JSON line of progress to the run's history (``splitmq plot`` reads it)."""
        if self.history_path is None:
            return
        line = {"time": time.time(), "party": self.party, **fields}
        with open(self.history_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def progress(self, line: str) -> None:
        """A data owner's live progress, redrawn in place at most twice a second when its output is
        a terminal (elsewhere the one log line per epoch says it)."""
        now = time.monotonic()
        if not self.tty or now - self._drawn < 0.5:
            return
        self._drawn = now
        sys.stderr.write("\r" + line[:160].ljust(self._width) + "\r")
        sys.stderr.flush()
        self._width = len(line[:160])

    def quantiles(self, values: list[float]) -> tuple[float, float]:
        """p50 and p99 of ``values`` (NaN when empty)."""
        if not values:
            return math.nan, math.nan
        v = sorted(values)
        return v[len(v) // 2], v[min(len(v) - 1, int(len(v) * 0.99))]
