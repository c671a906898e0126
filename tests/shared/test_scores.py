"""Task metrics, checked against values computed by hand and by scikit-learn's definitions."""
from __future__ import annotations

import math

import pytest
import torch

from splitmq.shared import scores


def test_roc_auc_matches_the_pairwise_definition_including_ties() -> None:
    # Given scores with a tie between a positive and a negative
    s = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    y = torch.tensor([0, 0, 1, 1, 1])
    # When the AUC is computed, Then it equals P(pos > neg) + 0.5 P(tie) over all pairs
    pos, neg = s[y == 1], s[y == 0]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos for n in neg]
    assert scores.roc_auc(s, y) == pytest.approx(sum(pairs) / len(pairs))
    assert scores.roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        scores.roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))


def test_a_classification_pass_reports_accuracy_and_mean_loss_over_batches() -> None:
    scorer = scores.Scorer("classification")
    scorer.update(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]), loss=1.0)
    scorer.update(torch.tensor([[0.3, 0.7]]), torch.tensor([1]), loss=4.0)
    result = scorer.result()
    assert result["accuracy"] == pytest.approx(2 / 3) and result["loss"] == pytest.approx(2.0)


def test_binary_and_regression_passes_report_their_metrics() -> None:
    binary = scores.Scorer("binary")
    binary.update(torch.tensor([[-2.0], [1.0], [0.5], [-0.1]]), torch.tensor([0, 1, 0, 1]))
    result = binary.result()
    assert result["accuracy"] == pytest.approx(0.5) and result["roc_auc"] == pytest.approx(0.75)
    regression = scores.Scorer("regression")
    regression.update(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 2.0]))
    result = regression.result()
    assert result["mae"] == pytest.approx(1.0) and result["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert scores.Scorer("regression").result() == {}
