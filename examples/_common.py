"""What every example shares: run the job's parties as processes over the broker, train the same
model locally, and print the two side by side. Not part of the splitmq package: an example of
using it."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import splitmq
from splitmq.workers.demo import write_job
from splitmq.workers.job_admin import delete_job
from splitmq.workers.launch import PartySpec, run_parties

HERE = Path(__file__).resolve().parent


def arguments(description: str, epochs: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/%2F"))
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--job-id", default=None, help="job name (default: the example's)")
    p.add_argument("--workdir", default=None, help="logs, summaries, checkpoints (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def run(cfg: splitmq.JobConfig, parties: list[PartySpec], args: argparse.Namespace) -> dict[str, Any]:
    """Every party as its own process (importing this folder's modules), to the end of the job."""
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"splitmq-{cfg.job_id}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    job = workdir / "job.toml"
    write_job(cfg, job)
    delete_job(cfg.job_id)  # a fresh run: nothing left over from an earlier one under this job id
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    return run_parties(job, parties, amqp_url=args.amqp_url, workdir=workdir, env=env).summaries


def report(title: str, metric: str, split: float, local: float, extra: dict[str, Any], args: argparse.Namespace) -> None:
    result = {"example": title, "metric": metric, "split": split, "local": local, **extra}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{title}\n  split over the broker: {metric} {split:.4f}\n  same model, locally:   {metric} {local:.4f}")
    for k, v in extra.items():
        print(f"  {k}: {v}")


def max_step_difference(split: list[float], local: list[float]) -> float:
    """Largest per-step loss difference (inf when the runs took a different number of steps)."""
    if len(split) != len(local):
        return float("inf")
    return max((abs(a - b) for a, b in zip(split, local)), default=0.0)


sys.path.insert(0, str(HERE))  # the examples import each other's factories by module name
