"""The stage abstraction and the pure numeric helpers it uses."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splitmq.shared import aggregate, schedule, staleness
from splitmq.shared.stage import Stage


def _segment() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_a_stashed_gradient_is_computed_at_the_weights_that_made_the_batch() -> None:
    # Given a stage with weight stashing that ran batch A, then was updated by batch B
    stage = Stage(_segment(), lr=0.1, stash_weights=True, input_grad=False)
    reference = copy.deepcopy(stage.segment)
    xa, xb, g = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 2)
    stage.forward("a", xa)
    stage.forward("b", xb)
    stage.backward("b", g)
    # When A's gradient arrives
    _, stale = stage.backward("a", g)
    # Then it was computed at A's weights (not the updated ones), and its staleness is 1
    out = reference(xa)
    expected = torch.autograd.grad(out, list(reference.parameters()), g)
    assert stale == 1
    assert stage.version == 2
    manual = copy.deepcopy(reference)
    with torch.no_grad():
        out_b = reference(xb)
    grads_b = torch.autograd.grad(manual(xb), list(manual.parameters()), g)
    with torch.no_grad():
        for p, gb, ga in zip(manual.parameters(), grads_b, expected):
            p -= 0.1 * gb
            p -= 0.1 * ga
    for p, q in zip(stage.segment.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q)
    assert out_b.shape == (5, 2)


def test_the_last_stage_returns_the_gradient_of_its_input() -> None:
    stage = Stage(nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1)), lr=0.1)
    x = torch.randn(6, 4)
    result = stage.loss_step(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert result.grad_input is not None and result.grad_input.shape == (6, 4)
    assert result.loss > 0 and 0 <= result.correct <= 6 and stage.version == 1


def test_delay_compensation_adds_the_diagonal_hessian_term_only_when_stale() -> None:
    dc = staleness.make("dc", dc_lambda=2.0)
    g, now, old = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(dc.correct(g, now, old, 1), g + 2.0 * g * g * (now - old))
    assert torch.equal(dc.correct(g, now, old, 0), g)
    torch.testing.assert_close(staleness.make("lr").correct(g, now, old, 3), g / 4)
    with pytest.raises(ValueError):
        staleness.make("magic")


def test_cosine_schedule_decays_from_the_base_rate_to_zero() -> None:
    lr_at = schedule.make("cosine", base_lr=0.03, total_steps=100)
    assert lr_at(0) == pytest.approx(0.03) and lr_at(50) == pytest.approx(0.015) and lr_at(100) == pytest.approx(0.0)
    assert schedule.make("constant", base_lr=0.03, total_steps=1)(10**6) == 0.03


def test_weighted_average_weighs_by_samples_and_refuses_mismatches() -> None:
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2) * 4}
    torch.testing.assert_close(aggregate.weighted_average([a, b], [3, 1])["w"], torch.ones(2))
    with pytest.raises(ValueError):
        aggregate.weighted_average([a, {"v": torch.ones(2)}], [1, 1])
