"""Staleness corrections over seeds: what each costs in accuracy with batches in flight.

``python -m splitmq.bench.staleness [--epochs 5] [--seeds 5] [--in-flight 4] [--optimizer SGD --lr 0.1]``
trains the seed MLP in one process through the parties' own Stages (``assemble.bottom_stage``
with its weight stash, and the trainer's last stage), as a one-owner job at K = ``--in-flight``
does, under two schedules of the gradients' return: ``bundle`` (K forwards, then their K
gradients: coalescing's default, staleness 0..K-1) and ``pipeline`` (one gradient back per new
forward: staleness K-1 every step). For each correction (``none``: plain weight stashing;
``dc``: delay compensation; ``lr``: staleness-scaled step) it prints the test accuracy per seed
and its mean against K=1 (which equals local training). Not part of the generated suite: no
transport, so it says nothing about CPU or bytes (``splitmq bench cpu`` times the stash).
"""
from __future__ import annotations

import argparse
import collections
import statistics
from typing import Sequence

import torch

from splitmq.shared import data, local, losses
from splitmq.shared.config import JobConfig, Staleness
from splitmq.workers import assemble

SCHEDULES = ("bundle", "pipeline")


def train(cfg: JobConfig, schedule: str) -> float:
    """Test accuracy of one run of ``cfg`` with its gradients returned as ``schedule`` says."""
    samples = assemble.owner_data(cfg, 0)
    per_epoch = data.batches_per_epoch(len(samples.train), cfg.batch_size)
    bottom = assemble.bottom_stage(cfg, 0, len(samples.train), "cpu")
    top = assemble.server_stage(cfg, 1, last=True, total_steps=lambda: cfg.epochs * per_epoch, device="cpu")
    out: collections.deque[tuple[int, torch.Tensor, torch.Tensor]] = collections.deque()

    def answer(count: int) -> None:
        for _ in range(count):
            key, cut, labels = out.popleft()
            grad = top.loss_step(cut, labels).grad_input
            assert grad is not None
            bottom.backward(key, grad)

    key = 0
    for epoch in range(cfg.epochs):
        for rows in data.batch_order(len(samples.train), cfg.batch_size, cfg.seed, epoch):
            batch = samples.train.batch(rows)
            assert batch.x is not None and batch.y is not None  # the seed MLP's data hold both
            out.append((key, bottom.forward(key, batch.x), batch.y))
            key += 1
            if len(out) == cfg.max_in_flight:
                answer(cfg.max_in_flight if schedule == "bundle" else 1)
    answer(len(out))
    assert samples.test is not None
    scores = local.evaluate(local.Chain([bottom.segment, top.segment]), samples.test, cfg.task.value,
                            losses.resolve(cfg.loss))
    return float(scores["accuracy"])


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--optimizer", default="SGD")
    p.add_argument("--lr", type=float, default=JobConfig().lr)
    p.add_argument("--dc-lambda", type=float, default=JobConfig().dc_lambda)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = range(args.seeds)

    def cfg(seed: int, in_flight: int, correction: Staleness) -> JobConfig:
        return JobConfig(epochs=args.epochs, seed=seed, max_in_flight=in_flight, staleness=correction,
                         optimizer=args.optimizer, lr=args.lr, dc_lambda=args.dc_lambda)

    base = [train(cfg(s, 1, Staleness.NONE), "pipeline") for s in seeds]
    print(f"K=1: {' / '.join(f'{a:.3f}' for a in base)} (mean {statistics.mean(base):.4f})", flush=True)
    print(f"| schedule | correction | accuracy at K={args.in_flight}, per seed | mean | Δ points vs K=1 |")
    print("|---|---|---|---:|---:|")
    for schedule in SCHEDULES:
        for correction in Staleness:
            accs = [train(cfg(s, args.in_flight, correction), schedule) for s in seeds]
            mean = statistics.mean(accs)
            print(f"| {schedule} | {correction.value} | {' / '.join(f'{a:.3f}' for a in accs)} | {mean:.4f} | "
                  f"{(mean - statistics.mean(base)) * 100:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
