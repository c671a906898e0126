"""What every splitmq process shares around its party loop: signals, metrics, the summary.

``run_party`` is the end of ``splitmq worker`` and ``splitmq server``: it serves metrics,
runs the loop, writes the summary and turns the named exit into the process's exit code.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Mapping
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)


def broker_username(url: str) -> str:
    return unquote(urlparse(url.replace(",", " ").split()[0]).username or "guest")


def redact(url: str) -> str:
    """The URL(s) without passwords, for logs."""
    out = []
    for u in url.replace(",", " ").split():
        parsed = urlparse(u)
        out.append(u.replace(f":{parsed.password}@", ":***@") if parsed.password else u)
    return ",".join(out)


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

    def __call__(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a stop request; True if one came."""
        return self._event.wait(timeout)


def history_path(run_dir: str | None, job: str, party: str) -> Path:
    """``<run_dir or runs/<job>>/history-<party>-<start stamp>.jsonl``: one file per run, so re-runs
    under one job id never mix (``splitmq plot`` draws the latest, or ``--run STAMP``)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return Path(run_dir or f"runs/{job}") / f"history-{party}-{stamp}.jsonl"


def write_json(path: str | None, data: Mapping[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
