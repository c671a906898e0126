"""Regression: scikit-learn's diabetes data set (442 patients, 10 measurements, disease progression
a year later), mean squared error, reported as mean absolute error.

    python examples/regression_diabetes.py [--epochs 60]
"""
from __future__ import annotations

import sys
from collections import OrderedDict

import torch
from torch import nn

import splitmq
from _common import arguments, max_step_difference, report, run
from splitmq.workers.launch import PartySpec


def patients() -> splitmq.Data:
    """Standardised measurements; the target scaled to unit spread (MAE is reported in that unit)."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    test, train = order[:88], order[88:]
    return splitmq.Data(splitmq.SampleSet(x[train], y[train], train), splitmq.SampleSet(x[test], y[test], test))


def model() -> nn.Sequential:
    return nn.Sequential(OrderedDict([("fc1", nn.Linear(10, 32)), ("relu", nn.ReLU()),
                                      ("fc2", nn.Linear(32, 1)), ("flat", nn.Flatten(0))]))


def job(epochs: int, job_id: str = "diabetes") -> splitmq.JobConfig:
    return splitmq.job(job_id=job_id, model="regression_diabetes:model", cuts=["relu"],
                       data="regression_diabetes:patients", loss="mse", task="regression", optimizer="Adam",
                       lr=0.01, epochs=epochs, batch_size=32)


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.splitlines()[0], epochs=60).parse_args(argv)
    cfg = job(args.epochs, args.job_id or "diabetes")
    summaries = run(cfg, [PartySpec("server", "server"), PartySpec("owner", "worker")], args)
    local = splitmq.train_local(cfg, data=patients())
    report("regression (diabetes, MSE)", "MAE", summaries["owner"]["test_scores"]["mae"], local.test_scores["mae"],
           {"largest per-step loss difference": max_step_difference(summaries["owner"]["losses"], local.losses)}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
