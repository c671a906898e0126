"""Running a whole job on one machine: every party its own ``splitmq`` process, as a user would.

``splitmq demo`` and the examples use it: the job is a TOML file every party loads with
``--config``; each party ends by itself when the job is done (a stage once every owner has
said goodbye), and its summary is read back. A party that fails or overruns is reported with
the end of its log.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

#: A job that has not finished in this long is stuck: its parties are stopped and it fails.
JOB_DEADLINE_S = 1800.0


@dataclass(frozen=True)
class PartySpec:
    """One process: ``command`` is ``server`` or ``worker``; ``args`` come after ``--config``."""

    name: str
    command: str
    args: tuple[str, ...] = ()


@dataclass
class Run:
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    workdir: Path = Path(".")


def run_parties(job: Path, parties: list[PartySpec], *, amqp_url: str, workdir: Path,
                env: dict[str, str] | None = None, deadline_s: float = JOB_DEADLINE_S,
                progress: Callable[[], None] | None = None) -> Run:
    """Start every party, wait for all to end by themselves, and read their summaries.

    Raises:
        RuntimeError: a party exited with a non-zero code or the job overran ``deadline_s``;
            the message holds the end of that party's log.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    full_env = {**os.environ, **(env or {})}
    for p in parties:
        argv = [sys.executable, "-m", "splitmq", p.command, "--config", str(job), "--amqp-url", amqp_url,
                "--run-dir", str(workdir / "run"), "--summary-json", str(workdir / f"{p.name}.json"), *p.args]
        with open(workdir / f"{p.name}.log", "wb") as log:
            procs[p.name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    started = time.monotonic()
    try:
        while any(proc.poll() is None for proc in procs.values()):
            failed = [n for n, proc in procs.items() if proc.poll() not in (None, 0)]
            if failed or time.monotonic() - started > deadline_s:
                raise RuntimeError(_failure(workdir, failed or [n for n, p in procs.items() if p.poll() is None],
                                            procs))
            if progress is not None:
                progress()
            time.sleep(0.5)  # polling child processes (and a progress display), bounded by the deadline
        failed = [n for n, proc in procs.items() if proc.returncode != 0]
        if failed:
            raise RuntimeError(_failure(workdir, failed, procs))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    return Run({n: json.loads((workdir / f"{n}.json").read_text()) for n in procs}, workdir)


def _failure(workdir: Path, names: list[str], procs: dict[str, subprocess.Popen[bytes]]) -> str:
    parts = [f"{n} (exit {procs[n].poll()}): ...{(workdir / f'{n}.log').read_text(errors='replace')[-1500:]}"
             for n in names]
    return "parties failed or overran; logs in " + str(workdir) + "\n" + "\n".join(parts)
