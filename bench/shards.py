"""8 data owners on one trainer, and over two sharded trainers: accuracy, throughput, CPU per sample.

    python -m splitmq.bench.shards --amqp-url URL[,URL...] [--epochs N] [--out-json FILE]
    python -m splitmq.bench.shards --replay        # in one process, no broker: merged vs averaged tops

Runs the same job twice as real processes (``splitmq server`` and ``splitmq worker``): once with
one trainer, once with ``shards = 2`` (owners 0, 2, 4, 6 on trainer 0; 1, 3, 5, 7 on trainer 1;
the tops merged every round, the bottoms averaged). Owner 0 evaluates after every epoch; its last
score is the job's (every owner ends with the same averaged bottom, every trainer with the same
top). Reported per run: the test accuracy, the aggregate samples/s (every owner's samples over
the span from the first owner's start to the last one's end), and the CPU seconds each party
spent while serving (its ``cpu_seconds``, all threads) per 1000 samples. ``tests/test_cluster.py``
runs it on a three-node cluster; docs/scaling.md has the numbers and the command.

``--replay`` replays the same job in one process with the same Stages (owners' batches in a
random interleaving, bottoms averaged every epoch) for one trainer, two trainers whose tops are
merged (``roles.replicas``), and two whose tops are plainly averaged: why the tops are merged.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from splitmq.shared import amqp, topology
from splitmq.shared.access import ManagementAPI
from splitmq.shared.config import JobConfig
from splitmq.workers.demo import write_job

log = logging.getLogger(__name__)

#: A run that has not finished in this long failed.
RUN_TIMEOUT_S = 900.0
CLIENTS = 8
#: Epochs of both runs. At 6 (48 batches per owner) the job is still climbing and the two-trainer
#: run lags one trainer by 0.7 points in replay (1.3-1.5 with real processes); at 12, 0.9; 20 is past the climb.
EPOCHS = 20
#: SGD learning rate of both runs.
LR = 0.1


def run_job(cfg: JobConfig, url: str, workdir: Path) -> dict[str, Any]:
    """One job to the end with real processes; its parties' summaries and the figures above.

    Raises:
        RuntimeError: a party exited non-zero, or the job overran ``RUN_TIMEOUT_S``.
    """
    d = workdir / cfg.job_id
    d.mkdir(parents=True)
    job = d / "job.toml"
    write_job(cfg, job)
    base = ["--config", str(job), "--amqp-url", url, "--run-dir", str(d / "run"), "--broker-timeout", "120"]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for k in range(cfg.shards):
        name = topology.shard_stages(topology.TOP_STAGE, cfg.shards)[k]
        shard = ["--shard", str(k)] if cfg.shards > 1 else []
        procs[name] = _start(d, name, "server", base + shard + ["--checkpoint-dir", str(d / f"ckpt-{name}")])
    for i in range(cfg.num_clients):
        name = topology.client_name(i)
        procs[name] = _start(d, name, "worker", base + ["--client-index", str(i), "--checkpoint-dir",
                                                       str(d / f"ckpt-{name}")] + ([] if i == 0 else ["--no-eval"]))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        for name, proc in procs.items():
            code = proc.wait(max(1.0, deadline - time.monotonic()))
            if code != 0:
                raise RuntimeError(f"{name} exited {code}: {(d / f'{name}.log').read_text()[-3000:]}")
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"job {cfg.job_id} overran {RUN_TIMEOUT_S:.0f}s") from exc
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return figures(cfg, {n: json.loads((d / f"{n}-summary.json").read_text()) for n in procs})


def _start(d: Path, name: str, command: str, args: list[str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "splitmq", command, *args, "--summary-json", str(d / f"{name}-summary.json")]
    with open(d / f"{name}.log", "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def figures(cfg: JobConfig, summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, aggregate samples/s and CPU per sample of one run, from its parties' summaries."""
    owners = [summaries[topology.client_name(i)] for i in range(cfg.num_clients)]
    trainers = [s for name, s in summaries.items() if topology.client_index(name) is None]
    samples = sum(o["samples"] for o in owners)
    span = max(o["samples"] / o["samples_per_second"] for o in owners if o["samples_per_second"])
    cpu_trainers = sum(t["cpu_seconds"] for t in trainers)
    cpu_owners = sum(o["cpu_seconds"] for o in owners)
    return {"trainers": cfg.shards, "clients": cfg.num_clients, "epochs": cfg.epochs, "samples": samples,
            "test_accuracy": owners[0]["test_scores"].get("accuracy"),
            "samples_per_second": samples / span,
            "trainer_cpu_ms_per_sample": 1000 * cpu_trainers / samples,
            "owner_cpu_ms_per_sample": 1000 * cpu_owners / samples,
            "cpu_ms_per_sample": 1000 * (cpu_trainers + cpu_owners) / samples,
            "trainer_cpu_seconds": [t["cpu_seconds"] for t in trainers]}


def compare(url: str, workdir: Path, *, epochs: int = EPOCHS, clients: int = CLIENTS,
            admin_url: str | None = None) -> dict[str, Any]:
    """The same job on one trainer, then over two; each job's queues deleted afterwards."""
    out: dict[str, Any] = {"runs": []}
    for shards in (1, 2):
        cfg = JobConfig(job_id="shards" + uuid.uuid4().hex[:8], num_clients=clients, epochs=epochs, lr=LR,
                        shards=shards)
        try:
            out["runs"].append(run_job(cfg, url, workdir))
        finally:
            _delete(cfg, url, admin_url)
    one, two = out["runs"]
    out["throughput_ratio"] = two["samples_per_second"] / one["samples_per_second"]
    out["accuracy_difference"] = two["test_accuracy"] - one["test_accuracy"]
    return out


def _delete(cfg: JobConfig, url: str, admin_url: str | None) -> None:
    """The job's queues and exchanges (through the management API when given, else what we know of)."""
    if admin_url:
        api = ManagementAPI(admin_url)
        for name in api.names("queues", f"splitmq.{cfg.job_id}."):
            api.delete_queue(name)
        for name in api.names("exchanges", f"splitmq.{cfg.job_id}."):
            api.delete_exchange(name)
        return
    stages = topology.shard_stages(topology.TOP_STAGE, cfg.shards)
    layout = topology.job_layout(cfg.job_id, stages=stages,
                                 parties=(*stages, *(topology.client_name(i) for i in range(cfg.num_clients))))
    amqp.delete_queues(url, [q.name for q in layout.queues])


def replay(*, epochs: int, lr: float, trainers: int, merge: str, seed: int = 0,
           clients: int = CLIENTS) -> float:
    """Test accuracy of the job replayed in this process; ``merge`` is "merge" or "average"."""
    import random

    import torch

    from splitmq.shared import aggregate, data
    from splitmq.workers import assemble
    from splitmq.workers.roles.replicas import merged_top
    cfg = JobConfig(num_clients=clients, epochs=epochs, lr=lr)
    owners = [assemble.owner_data(cfg, i) for i in range(clients)]
    bottoms = [assemble.bottom_stage(cfg, i, len(o.train), "cpu") for i, o in enumerate(owners)]
    per = data.batches_per_epoch(len(owners[0].train), cfg.batch_size)
    tops = [assemble.server_stage(cfg, 1, last=True, total_steps=lambda: epochs * per * clients // trainers,
                                  device="cpu") for _ in range(trainers)]
    rng = random.Random(seed)
    base = {k: v.clone() for k, v in tops[0].segment.state_dict().items()}  # every top starts the same
    for epoch in range(epochs):
        turns = [i for i in range(clients) for _ in range(per)]
        rng.shuffle(turns)  # the owners' batches reach the trainers interleaved
        done = [0] * clients
        for i in turns:
            batch = owners[i].train.batch(data.batch_order(len(owners[i].train), cfg.batch_size, cfg.seed + i,
                                                           epoch)[done[i]])
            key = (epoch, done[i])
            done[i] += 1
            assert isinstance(batch.x, torch.Tensor) and batch.y is not None  # built-in data: labelled tensors
            out = tops[topology.shard_of(i, trainers)].loss_step(bottoms[i].forward(key, batch.x), batch.y)
            assert out.grad_input is not None
            bottoms[i].backward(key, out.grad_input)
        average = aggregate.weighted_average([b.segment.state_dict() for b in bottoms], [len(o.train) for o in owners])
        for b in bottoms:
            b.segment.load_state_dict(average)
        if trainers > 1:
            states = [{k: v.clone() for k, v in t.segment.state_dict().items()} for t in tops]
            top = (merged_top([base] * trainers, states) if merge == "merge"
                   else aggregate.weighted_average(states, [1] * trainers))
            for t in tops:
                t.segment.load_state_dict(top)
        base = {k: v.clone() for k, v in tops[0].segment.state_dict().items()}
    test = owners[0].test
    assert test is not None and isinstance(test.x, torch.Tensor) and test.y is not None
    with torch.no_grad():
        scores = tops[0].infer(bottoms[0].infer(test.x))                  # (N, 10)
    return float((scores.argmax(1) == test.y).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitmq.bench.shards", description=__doc__.split("\n")[0])
    p.add_argument("--amqp-url", help="the broker (a cluster's nodes comma-separated)")
    p.add_argument("--replay", action="store_true", help="in this process: one trainer, two merging, two averaging")
    p.add_argument("--admin-url", help="management API (comma-separated for a cluster), to delete the jobs after")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--seeds", type=int, default=5, help="--replay: interleavings of the owners' batches per setting")
    p.add_argument("--work-dir", default="/tmp/splitmq-bench-shards")
    p.add_argument("--out-json", help="write the results here too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.replay:
        result: dict[str, Any] = {"replay": [
            {"epochs": args.epochs, "lr": lr, "seed": seed,
             **{name: replay(epochs=args.epochs, lr=lr, trainers=t, merge=m, seed=seed)
                for name, t, m in (("one", 1, ""), ("merged", 2, "merge"), ("averaged", 2, "average"))}}
            for lr in (0.03, LR) for seed in range(args.seeds)]}
    elif not args.amqp_url:
        p.error("--amqp-url is needed (or --replay)")
    else:
        result = compare(args.amqp_url, Path(args.work_dir), epochs=args.epochs, admin_url=args.admin_url)
    result["command"] = "python -m splitmq.bench.shards " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(result, indent=1)
    print(text)
    if args.out_json:
        Path(args.out_json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
