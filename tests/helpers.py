"""Helpers for tests that run real parties against the real broker."""
from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry

from shared.config import JobConfig
from shared.metrics import Metrics
from workers.server import Trainer, TrainerOptions
from workers.worker import Worker, WorkerOptions


class TrainerThread:
    """A Trainer serving in a background thread of the test process."""

    def __init__(self, cfg: JobConfig, amqp_url: str, **options: Any) -> None:
        self.trainer = Trainer(cfg, TrainerOptions(amqp_url=amqp_url, **options),
                               metrics=Metrics("trainer", CollectorRegistry()))
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.summary = self.trainer.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def __enter__(self) -> "TrainerThread":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.trainer.stop.set("test done")
        self._thread.join(60)
        if self.error:
            raise self.error


def make_worker(cfg: JobConfig, amqp_url: str, index: int = 0, **options: Any) -> Worker:
    opts = WorkerOptions(client_id=f"client-{index}", client_index=index, amqp_url=amqp_url, **options)
    return Worker(cfg, opts, metrics=Metrics("worker", CollectorRegistry()))
