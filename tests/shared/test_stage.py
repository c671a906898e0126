"""The stage abstraction and the pure numeric helpers it uses."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splitmq.shared import aggregate, losses, schedule, staleness
from splitmq.shared.optim import OptimizerSpec
from splitmq.shared.stage import Stage

SGD = OptimizerSpec("SGD", 0.1)


def _segment() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_a_stashed_gradient_is_computed_at_the_weights_that_made_the_batch() -> None:
    # Given a stage with weight stashing that ran batch A, then was updated by batch B
    stage = Stage(_segment(), optimizer=SGD, stash_weights=True, input_grad=False)
    reference = copy.deepcopy(stage.segment)
    xa, xb, g = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 2)
    stage.forward("a", xa)
    stage.forward("b", xb)
    stage.backward("b", g)
    # When A's gradient arrives
    _, stale = stage.backward("a", g)
    # Then it was computed at A's weights (not the updated ones), and its staleness is 1
    expected = torch.autograd.grad(reference(xa), list(reference.parameters()), g)
    manual = copy.deepcopy(reference)
    grads_b = torch.autograd.grad(manual(xb), list(manual.parameters()), g)
    with torch.no_grad():
        for p, gb, ga in zip(manual.parameters(), grads_b, expected):
            p -= 0.1 * gb
            p -= 0.1 * ga
    assert stale == 1 and stage.version == 2
    for p, q in zip(stage.segment.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q)


def test_batches_of_one_version_share_one_stash_and_new_weights_loaded_between_them_are_used() -> None:
    # Given a stashing stage that forwarded batch A
    stage = Stage(_segment(), optimizer=SGD, stash_weights=True, input_grad=False)
    x = torch.randn(5, 4)
    stage.forward("a", x)
    # When batch B follows at the same version, and C after the weights were replaced (an average)
    out_b = stage.forward("b", x)
    replaced = {k: v + 1.0 for k, v in stage.segment.state_dict().items()}
    stage.load_weights(replaced)
    out_c = stage.forward("c", x)
    # Then A and B share one snapshot, copied when the load overwrote its weights; C uses the new weights
    sa, sb, sc = (stage._pending[k].snapshot for k in "abc")
    assert sa is sb and sc is not sa and sa is not None and sa.copies and sc is not None and not sc.copies
    with torch.no_grad():
        torch.testing.assert_close(out_c, stage.segment(x))
        assert not torch.allclose(out_b, out_c)


def test_weights_are_copied_only_when_an_update_overwrites_what_a_batch_in_flight_still_needs() -> None:
    # Given a stashing stage without a correction, on a segment whose first layer's weight its backward never reads
    stage = Stage(_segment(), optimizer=SGD, stash_weights=True, input_grad=False)
    x, g = torch.randn(5, 4), torch.randn(5, 2)
    # When a batch is answered before the next update (as at K=1)
    stage.forward(0, x)
    first = stage._pending[0].snapshot
    stage.backward(0, g)
    # Then nothing was copied
    assert first is not None and not first.copies
    # When two batches are out and the first one's update lands while the second still waits
    stage.forward(1, x)
    stage.forward(2, x)
    stage.backward(1, g)
    # Then only what the second one's backward reads was copied: the second layer's weight, not the first's
    second = stage._pending[2].snapshot
    assert second is not None
    w1, w2 = stage.segment[0].weight, stage.segment[2].weight
    assert w2.untyped_storage().data_ptr() in second.copies
    assert w1.untyped_storage().data_ptr() not in second.copies
    # And delay compensation, which reads every old weight, has all of them copied
    dc = Stage(_segment(), optimizer=SGD, correction=staleness.make("dc"), stash_weights=True, input_grad=False)
    dc.forward(1, x)
    dc.forward(2, x)
    dc.backward(1, g)
    snapshot = dc._pending[2].snapshot
    assert snapshot is not None and len(snapshot.copies) == len(list(dc.segment.parameters()))


def test_a_segment_with_batch_norm_trains_with_several_batches_in_flight() -> None:
    # Given a stashing stage whose forward updates batch norm's running statistics in place
    torch.manual_seed(0)
    stage = Stage(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU()), optimizer=SGD,
                  stash_weights=True, input_grad=False)
    reference = copy.deepcopy(stage.segment)
    xa, xb, g = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 3)
    # When batch B's forward and update land between batch A's forward and its gradient
    stage.forward("a", xa)
    stage.forward("b", xb)
    stage.backward("b", g)
    stage.backward("a", g)
    # Then A's gradient was computed at the weights that made A (autograd's own check refused this
    # before: the running statistics it keeps had changed, though a training backward never reads them)
    grads_a = torch.autograd.grad(reference(xa), list(reference.parameters()), g)
    grads_b = torch.autograd.grad(reference(xb), list(reference.parameters()), g)
    with torch.no_grad():
        for p, ga, gb in zip(reference.parameters(), grads_a, grads_b):
            p -= 0.1 * gb
            p -= 0.1 * ga
    assert stage.version == 2
    for p, q in zip(stage.segment.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_a_kept_activation_changed_in_place_before_its_gradient_is_refused() -> None:
    # Given a stashing stage that handed out a batch's activations (its ReLU keeps them for the backward)
    stage = Stage(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), optimizer=SGD, stash_weights=True, input_grad=False)
    out = stage.forward("a", torch.randn(5, 4))
    # When someone writes into them before the gradient comes
    out.add_(1.0)
    # Then the backward refuses, as autograd would, instead of using the changed values
    with pytest.raises(RuntimeError, match="modified in place"):
        stage.backward("a", torch.randn(5, 3))


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_any_torch_optimizer_drives_a_stage_and_its_state_survives_a_checkpoint(name: str) -> None:
    # Given a stage with an adaptive optimizer that has taken a step
    stage = Stage(_segment(), optimizer=OptimizerSpec(name, 0.01), input_grad=False)
    stage.forward(0, torch.randn(5, 4))
    stage.backward(0, torch.randn(5, 2))
    # When its state is restored into a fresh stage and both take the same next step
    other = Stage(_segment(), optimizer=OptimizerSpec(name, 0.01), input_grad=False)
    other.load_state(copy.deepcopy(stage.state()))
    x, g = torch.randn(5, 4), torch.randn(5, 2)
    for s in (stage, other):
        s.forward(1, x)
        s.backward(1, g)
    # Then they stay identical (the optimizer's moments were carried over)
    assert other.version == stage.version == 2
    for p, q in zip(stage.segment.parameters(), other.segment.parameters()):
        assert torch.equal(p, q)


def test_the_last_stage_uses_its_loss_and_returns_the_gradient_of_its_input() -> None:
    stage = Stage(nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1)), optimizer=SGD, loss=losses.resolve("nll"))
    x = torch.randn(6, 4)
    result = stage.loss_step(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert result.grad_input is not None and result.grad_input.shape == (6, 4)
    assert result.loss > 0 and stage.version == 1 and result.output.shape == (6, 3)


def test_a_local_loss_on_the_stage_changes_its_update_but_not_what_it_sends() -> None:
    # Given two identical bottoms, one with a local loss on its own side (NoPeek-style)
    plain = Stage(_segment(), optimizer=SGD, input_grad=False)
    extra = Stage(_segment(), optimizer=SGD, input_grad=False,
                  local_loss=lambda x, out: (out ** 2).mean())
    x, g = torch.randn(5, 4), torch.randn(5, 2)
    # When both run the same batch and gradient
    sent = [s.forward(0, x) for s in (plain, extra)]
    for s in (plain, extra):
        s.backward(0, g)
    # Then they sent the same activations but updated differently
    assert torch.equal(sent[0], sent[1])
    assert not all(torch.equal(p, q) for p, q in zip(plain.segment.parameters(), extra.segment.parameters()))


def test_delay_compensation_adds_the_diagonal_hessian_term_only_when_stale() -> None:
    dc = staleness.make("dc", dc_lambda=2.0)
    g, now, old = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(dc.correct(g.clone(), now, old, 1), g + 2.0 * g * g * (now - old))
    assert torch.equal(dc.correct(g, now, old, 0), g)
    torch.testing.assert_close(staleness.make("lr").correct(g, now, old, 3), g / 4)
    with pytest.raises(ValueError):
        staleness.make("magic")


def test_cosine_schedule_decays_its_factor_from_one_to_zero_over_a_total_that_may_grow() -> None:
    factor = schedule.make("cosine", 100)
    assert factor(0) == pytest.approx(1.0) and factor(50) == pytest.approx(0.5) and factor(100) == pytest.approx(0.0)
    assert schedule.make("constant", 1)(10**6) == 1.0
    total = [100]
    growing = schedule.make("cosine", lambda: total[0])
    total[0] = 200
    assert growing(100) == pytest.approx(0.5)


def test_weighted_average_weighs_by_samples_and_refuses_mismatches() -> None:
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2) * 4}
    torch.testing.assert_close(aggregate.weighted_average([a, b], [3, 1])["w"], torch.ones(2))
    with pytest.raises(ValueError):
        aggregate.weighted_average([a, {"v": torch.ones(2)}], [1, 1])


@pytest.mark.parametrize("name, out, labels", [
    ("cross_entropy", torch.randn(4, 3), torch.tensor([0, 1, 2, 1])),
    ("nll", torch.log_softmax(torch.randn(4, 3), 1), torch.tensor([0, 1, 2, 1])),
    ("bce_with_logits", torch.randn(4, 1), torch.tensor([0, 1, 1, 0])),
    ("mse", torch.randn(4), torch.tensor([0.5, 1.0, 2.0, 3.0])),
])
def test_built_in_losses_take_labels_as_the_data_gives_them(name: str, out: torch.Tensor, labels: torch.Tensor) -> None:
    value = losses.resolve(name)(out, labels)
    assert value.dim() == 0 and torch.isfinite(value)


def test_a_loss_by_import_path_is_loaded_from_the_local_machine_and_a_bad_one_is_named() -> None:
    assert losses.resolve("torch.nn.functional:l1_loss") is torch.nn.functional.l1_loss
    with pytest.raises(ValueError, match="cannot import"):
        losses.resolve("no_such_module:loss")
    with pytest.raises(ValueError, match="unknown loss"):
        losses.resolve("hinge")
