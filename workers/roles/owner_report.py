"""What a data owner tells its user: a log line per epoch, a live progress line, its summary."""
from __future__ import annotations

import logging
import math
from typing import Any

from splitmq.shared import scores
from splitmq.shared.config import JobConfig
from splitmq.workers.stats import Stats

log = logging.getLogger("splitmq.workers.roles.bottom")


class OwnerReport:
    """Rates and ETAs from how many of the run's batches are applied, and since when."""

    def __init__(self, me: str, cfg: JobConfig, stats: Stats) -> None:
        self.me, self.cfg, self.stats = me, cfg, stats
        self.started = 0.0
        self.applied_at_start = 0
        self.scores: dict[str, float] = {}
        self.losses: dict[int, float] = {}

    def begin(self, now: float, applied: int) -> None:
        self.started, self.applied_at_start = now, applied

    def _pace(self, now: float, done: int, total: int) -> tuple[float, float]:
        """Samples per second in this run, and seconds left."""
        run = done - self.applied_at_start
        elapsed = max(1e-9, now - self.started)
        return run * self.cfg.batch_size / elapsed, (total - done) * elapsed / max(1, run)

    def epoch_done(self, now: float, epoch: int, metrics: dict[str, float], done: int, total: int,
                   prefix: int) -> None:
        """One line per epoch (and a history record): loss, test metrics, samples/s, ETA."""
        if metrics:
            self.scores = metrics
            self.stats.evaluated(metrics)
        self.stats.gauge("epoch", epoch)
        rate, left = self._pace(now, done, total)
        score = ", ".join(f"test {k} {v:.4f}" for k, v in metrics.items()) or "no evaluation"
        loss = self.stats.last_loss
        log.info("%s: epoch %d/%d: loss %s, %s, %.0f samples/s, ETA %s", self.me, epoch + 1, self.cfg.epochs,
                 "n/a" if loss is None else f"{loss:.4f}", score, rate, duration(left))
        self.stats.history(epoch=epoch, seq=prefix, loss=loss, samples=self.stats.counts["samples"],
                           **{f"test_{k}": v for k, v in metrics.items()})

    def progress(self, now: float, epoch: int, done: int, total: int) -> None:
        rate, left = self._pace(now, done, total)
        bar = "#" * int(20 * done / max(1, total))
        loss = self.stats.last_loss
        self.stats.progress(f"{self.me} epoch {epoch + 1}/{self.cfg.epochs} [{bar:<20}] {done}/{total} loss "
                            f"{'n/a' if loss is None else f'{loss:.4f}'} {rate:.0f} samples/s ETA {duration(left)}")

    def summary(self, now: float, done: int, total: int) -> dict[str, Any]:
        p50, p99 = self.stats.quantiles(self.stats.round_trips)
        seconds = max(1e-9, now - self.started)
        samples = self.stats.counts["samples"]
        headline = scores.headline(self.cfg.task.value)
        return {"client_id": self.me, "epochs": self.cfg.epochs, "batches": done - self.applied_at_start,
                "samples": samples, "samples_per_second": samples / seconds, "max_in_flight": self.cfg.max_in_flight,
                "completed": done >= total, "losses": [self.losses[k] for k in sorted(self.losses)],
                "test_scores": self.scores, "test_metric": headline, "test_value": self.scores.get(headline, math.nan),
                "round_trip_p50_s": p50, "round_trip_p99_s": p99, "duplicates": self.stats.counts["duplicates"],
                "skipped": self.stats.counts["skipped"]}


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
