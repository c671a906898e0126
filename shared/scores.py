"""Task metrics over an evaluation pass: accuracy, ROC AUC, MAE and RMSE. Pure torch.

A ``Scorer`` accumulates each evaluation batch's outputs and labels and gives the pass's
metrics at the end. The task decides which metrics and how outputs are read:

- ``classification``: outputs are (B, C) scores; accuracy of the arg-max.
- ``binary``: one logit per sample; accuracy at logit 0 and ROC AUC.
- ``regression``: predictions; mean absolute and root mean squared error.
"""
from __future__ import annotations

import math

import torch

TASKS = ("classification", "binary", "regression")
#: Every metric name a task can give (a fixed set: they label a Prometheus gauge).
METRIC_NAMES = ("loss", "accuracy", "roc_auc", "mae", "rmse")


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the probability a positive outranks a negative (ties count half).

    Raises:
        ValueError: when only one class is present (the AUC is undefined).
    """
    scores, labels = scores.reshape(-1).double(), labels.reshape(-1).bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both classes")
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    unique, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class Scorer:
    """Accumulates one evaluation pass of a task."""

    def __init__(self, task: str) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task = task
        self._outputs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._loss_sum = 0.0
        self._count = 0

    def update(self, output: torch.Tensor, labels: torch.Tensor, loss: float | None = None) -> None:
        """Add one batch (``loss`` is the batch's mean loss, if known)."""
        output, labels = output.detach().cpu(), labels.detach().cpu()
        self._outputs.append(output)
        self._labels.append(labels)
        if loss is not None:
            self._loss_sum += loss * len(labels)
        self._count += len(labels)

    def result(self) -> dict[str, float]:
        """The pass's metrics (empty before any batch)."""
        if not self._count:
            return {}
        out, y = torch.cat(self._outputs), torch.cat(self._labels)
        result: dict[str, float] = {}
        if self._loss_sum:
            result["loss"] = self._loss_sum / self._count
        if self.task == "classification":
            result["accuracy"] = float((out.argmax(1) == y.long()).double().mean())
        elif self.task == "binary":
            logit = out.reshape(-1)
            result["accuracy"] = float(((logit > 0) == y.reshape(-1).bool()).double().mean())
            try:
                result["roc_auc"] = roc_auc(logit, y)
            except ValueError:
                pass
        else:
            err = out.reshape(len(y), -1).double() - y.reshape(len(y), -1).double()
            result["mae"] = float(err.abs().mean())
            result["rmse"] = math.sqrt(float((err * err).mean()))
        return result


def headline(task: str) -> str:
    """The metric a summary leads with for ``task``."""
    return {"classification": "accuracy", "binary": "roc_auc", "regression": "mae"}[task]
