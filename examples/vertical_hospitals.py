"""Vertical split on tabular data: two hospitals hold different columns of partly the same patients.

Hospital A measured the first 15 features of scikit-learn's breast-cancer data set, hospital B
the other 15; each saw about 85% of the 569 patients, and only about 70% of them at both. A
lab (the trainer) holds every diagnosis. The three find the patients they all have by private
set intersection (no patient id outside the intersection is revealed), then train a model whose
bottoms read each hospital's columns and whose top, at the lab, joins them: binary
cross-entropy, ROC AUC. The same model trained in one process on the same patients, in the
same order, gives the same per-step losses.

    python examples/vertical_hospitals.py [--epochs 30]
"""
from __future__ import annotations

import sys
from collections import OrderedDict

import torch
from torch import nn

import splitmq
from _common import arguments, max_step_difference, report, run
from splitmq.workers.launch import PartySpec

PATIENTS = 569
#: Patient ids as the hospitals write them (never row numbers: they are names across parties).
FIRST_ID = 900_000


def _table() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer  # ships its data inside the package

    x, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0), torch.tensor(y, dtype=torch.int64)  # (569, 30), (569,)


def patients(client_index: int) -> torch.Tensor:
    """Rows of the patients hospital ``client_index`` saw (fixed by a seed: ~85% each)."""
    g = torch.Generator().manual_seed(17 + client_index)
    return torch.sort(torch.randperm(PATIENTS, generator=g)[: int(PATIENTS * 0.85)]).values


def hospital(client_index: int) -> splitmq.Data:
    """A hospital's own columns of its own patients (no labels); the lab decides what is held out."""
    x, _ = _table()
    rows = patients(client_index)
    columns = slice(0, 15) if client_index == 0 else slice(15, 30)
    return splitmq.Data(splitmq.SampleSet(x[rows][:, columns], None, FIRST_ID + rows))


def lab() -> splitmq.Data:
    """Every diagnosis, by patient id; a fixed fifth is held out for evaluation."""
    _, y = _table()
    order = torch.randperm(PATIENTS, generator=torch.Generator().manual_seed(5))
    test, train = order[: PATIENTS // 5], order[PATIENTS // 5:]
    return splitmq.Data(splitmq.SampleSet(None, y[train], FIRST_ID + train),
                        splitmq.SampleSet(None, y[test], FIRST_ID + test))


def model(part: str, party: int = 0, parties: int = 2) -> nn.Module:
    """Each hospital's bottom reads its 15 columns; the lab's top reads both bottoms' 16 features."""
    if part == "bottom":
        return nn.Sequential(OrderedDict([("fc", nn.Linear(15, 16)), ("act", nn.ReLU())]))
    return nn.Sequential(OrderedDict([("fc1", nn.Linear(16 * parties, 16)), ("act", nn.ReLU()),
                                      ("out", nn.Linear(16, 1))]))


def job(epochs: int, job_id: str = "hospitals") -> splitmq.JobConfig:
    return splitmq.job(job_id=job_id, model="vertical_hospitals:model", data="vertical_hospitals:hospital",
                       vertical_parts=2, label_source="top", align="psi", bottom_sync="independent",
                       loss="bce_with_logits", task="binary", optimizer="Adam", lr=0.01, epochs=epochs,
                       batch_size=32)


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__.splitlines()[0], epochs=30).parse_args(argv)
    cfg = job(args.epochs, args.job_id or "hospitals")
    parties = [PartySpec("lab", "server", ("--data", "vertical_hospitals:lab"))]
    parties += [PartySpec(f"hospital-{i}", "worker", ("--client-index", str(i))) for i in range(2)]
    summaries = run(cfg, parties, args)
    local = splitmq.train_local(cfg, data=lab(), parties=[hospital(0), hospital(1)])
    split_auc = summaries["hospital-0"]["test_scores"]["roc_auc"]
    losses = summaries["hospital-0"]["losses"]
    report("vertical hospitals (breast cancer, PSI-aligned, 2 parties + lab)", "ROC AUC", split_auc,
           local.test_scores["roc_auc"], {"samples trained on per epoch": summaries["hospital-0"]["samples"]
                                          // args.epochs, "largest per-step loss difference":
                                          max_step_difference(losses, local.losses)}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
