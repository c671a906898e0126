"""Helpers for tests that run real parties against the real broker."""
from __future__ import annotations

import os
import threading
from typing import Any

from prometheus_client import CollectorRegistry

from splitmq.shared.config import JobConfig
from splitmq.shared.metrics import Metrics
from splitmq.workers.server import Trainer, TrainerOptions
from splitmq.workers.worker import Worker, WorkerOptions


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


class Party:
    """A ``splitmq`` command running as its own process, logging to ``<tmp>/<name>.log``."""

    def __init__(self, name: str, args: list[str], tmp: "os.PathLike[str] | str") -> None:
        import subprocess
        import sys
        from pathlib import Path

        self.name = name
        self.log_path = Path(tmp) / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "splitmq", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 300) -> int:
        """Wait for the process to exit by itself; fails the test with its log if it does not."""
        import subprocess

        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.name} did not finish in {timeout}s:\n{self.log()}") from None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (finish the current message, checkpoint, exit) and wait."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]


def job_args(cfg: JobConfig, amqp_url: str) -> list[str]:
    """Command-line flags that give a party exactly ``cfg``."""
    args = ["--amqp-url", amqp_url, "--job-id", cfg.job_id, "--model", cfg.model, "--num-clients",
            str(cfg.num_clients), "--epochs", str(cfg.epochs), "--max-in-flight", str(cfg.max_in_flight),
            "--bottom-sync", cfg.bottom_sync, "--staleness", cfg.staleness, "--label-source", cfg.label_source,
            "--lr-schedule", cfg.lr_schedule, "--vertical-parts", str(cfg.vertical_parts), "--seed", str(cfg.seed)]
    if cfg.cuts:
        args += ["--cuts", ",".join(map(str, cfg.cuts))]
    return args
