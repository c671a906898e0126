"""The cut's defences as pure pieces: dCor, NoPeek and its collapse guard, noise, the bottleneck,
label protection, and the job settings that choose them."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from splitmq.shared import privacy
from splitmq.shared.config import PRIVACY_PRESETS, JobConfig, LabelSource, Privacy, Task
from splitmq.shared.errors import ConfigError
from splitmq.shared.label_protection import MarvellNoise, NoProtection, Spread, optimal_covariances, sum_kl
from splitmq.workers import assemble, attacks


def conv_cut() -> nn.Sequential:
    """A model cut before its convolutions end: the cut is not flat, the top starts with a conv."""
    return nn.Sequential(OrderedDict([
        ("unflatten", nn.Unflatten(1, (1, 28, 28))), ("conv1", nn.Conv2d(1, 4, 3)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 4, 3)), ("flatten", nn.Flatten()), ("fc", nn.Linear(4 * 24 * 24, 10)),
    ]))


def test_distance_correlation_is_one_for_a_similarity_and_falls_with_batch_size_for_independent_ones() -> None:
    # Given a batch, a scaled and shifted copy, a noisy non-linear function of it, and independent batches
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=g, dtype=torch.float64)
    independent = torch.randn(512, 20, generator=g, dtype=torch.float64)
    # When their distance correlations are computed
    same = float(privacy.distance_correlation(x, 3 * x + 1))
    related = float(privacy.distance_correlation(x, torch.tanh(x) + 0.3 * independent))
    apart_64 = float(privacy.distance_correlation(x[:64], independent[:64]))
    apart_512 = float(privacy.distance_correlation(x, independent))
    # Then a similarity transform gives 1, a dependent batch stays high, and independent batches
    # score only the estimate's bias, which is large in 20 dimensions at B = 64 and shrinks with B
    assert same == pytest.approx(1.0, abs=1e-6)
    assert related > 0.8
    assert 0.0 <= apart_512 < 0.5 < apart_64 < related


def test_distance_correlation_has_a_finite_gradient_even_for_identical_rows_and_tiny_batches() -> None:
    # Given activations with two identical rows, and a one-sample batch
    x = torch.randn(8, 5)
    z = torch.randn(8, 3)
    z = torch.cat([z[:1], z]).requires_grad_()
    # When dCor is differentiated
    value = privacy.distance_correlation(torch.cat([x[:1], x]), z)
    value.backward()
    # Then the gradient is finite; a single sample gives 0
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())
    assert float(privacy.distance_correlation(x[:1], z[:1]).detach()) == 0.0


def test_nopeek_ramps_its_weight_over_the_warm_up_and_reports_each_batch_dcor() -> None:
    # Given NoPeek with lambda 2 over a 10-update warm-up, at update 5
    step, seen = [5], []
    loss = privacy.NoPeek(weight=2.0, warmup_steps=10, progress=lambda: step[0], report=seen.append)
    x, z = torch.randn(16, 12), torch.randn(16, 4)
    # When it scores a batch at update 5, then at update 10
    half = float(loss(x, z))
    step[0] = 10
    full = float(loss(x, z))
    # Then the weight was 1 then 2 on the same dCor, and both dCors were reported
    dcor = float(privacy.distance_correlation(x, z))
    assert half == pytest.approx(1.0 * dcor) and full == pytest.approx(2.0 * dcor)
    assert seen == pytest.approx([dcor, dcor])


def test_dimension_counts_the_directions_a_batch_spans_however_it_is_shaped() -> None:
    # Given batches spanning 5 equal directions (wide and tall), a line, and nothing
    wide, tall = 3 * torch.eye(5, 30), 3 * torch.eye(30, 5)
    line = torch.randn(40, 1) * torch.randn(1, 12)
    # When their effective dimensions are computed
    # Then they are 5, 5, 1 and 0
    assert privacy.dimension(wide) == pytest.approx(5.0)
    assert privacy.dimension(tall) == pytest.approx(5.0)
    assert privacy.dimension(line) == pytest.approx(1.0)
    assert privacy.dimension(torch.zeros(8, 4)) == 0.0


def test_the_collapse_guard_stops_when_the_tops_gradient_asks_for_directions_the_activations_lost() -> None:
    # Given varied activations with a gradient as varied, and a binary model's (both on one line)
    g = torch.Generator().manual_seed(0)
    line = torch.randn(1, 20, generator=g)
    healthy = privacy.CollapseGuard(patience=3)
    for _ in range(6):
        healthy.check(torch.randn(32, 20, generator=g), torch.randn(32, 20, generator=g))
        healthy.check(torch.randn(32, 1, generator=g) * line, torch.randn(32, 1, generator=g) * line)
    # When activations collapse onto a line while the gradient still spans many directions
    guard = privacy.CollapseGuard(patience=3)
    collapsed = torch.randn(32, 1, generator=g) * line
    guard.check(collapsed, torch.randn(32, 20, generator=g))
    guard.check(collapsed, torch.randn(32, 20, generator=g))
    guard.check(collapsed[:1], torch.randn(1, 20, generator=g))     # one sample says nothing
    # Then neither healthy run stopped, and only the third collapsed batch stops it, naming the setting
    assert healthy.ratio < privacy.COLLAPSE_MISMATCH
    with pytest.raises(privacy.ActivationCollapse, match="nopeek_lambda"):
        guard.check(collapsed, torch.randn(32, 20, generator=g))
    # And activations that stopped varying at all stop it too
    dead = privacy.CollapseGuard(patience=2)
    dead.check(torch.ones(32, 20), torch.randn(32, 20, generator=g))
    with pytest.raises(privacy.ActivationCollapse):
        dead.check(torch.ones(32, 20), torch.randn(32, 20, generator=g))


def test_cut_noise_follows_the_activation_scale_and_leaves_the_segments_state_unchanged() -> None:
    # Given a segment with noise of scale 0.5 attached
    seg = nn.Sequential(nn.Linear(8, 300))
    keys = set(seg.state_dict())
    plain = seg(torch.randn(64, 8)).detach()
    privacy.CutNoise(0.5).attach(seg)
    # When the same input goes through it twice
    x = torch.randn(64, 8)
    a, b = seg(x), seg(x)
    # Then the outputs differ by noise of about 0.5 * their std (the difference has sqrt(2) of it)
    ratio = float((a - b).detach().std() / (2 ** 0.5 * 0.5 * a.detach().std()))
    assert 0.85 < ratio < 1.15 and plain.shape == a.shape
    # And the segment's state_dict is unchanged (owners with and without noise can average bottoms)
    assert set(seg.state_dict()) == keys


def test_a_bottleneck_narrows_the_owners_cut_and_the_first_server_stage_takes_it() -> None:
    # Given the seed MLP with a 16-wide bottleneck
    cfg = JobConfig(bottleneck=16)
    probe = torch.randn(2, 784)
    # When the owner's and the top's stages are built the way the parties build them
    owner = assemble.owner_segment(cfg, 0, probe)
    again = assemble.owner_segment(cfg, 0, probe)
    top = assemble.server_stage(cfg, 1, last=True, total_steps=lambda: 10, device="cpu")
    # Then the owner sends 16 features, every owner builds the same layer, and the top takes them
    cut = owner(torch.randn(5, 784))
    assert cut.shape == (5, 16)
    for p, q in zip(owner.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert top.infer(cut.detach()).shape == (5, 10)


def test_a_bottleneck_is_refused_on_a_cut_it_cannot_narrow() -> None:
    # Given a model whose cut is an image and whose top starts with a convolution
    cfg = JobConfig(model="tests.shared.test_privacy:conv_cut", cuts=("relu1",), bottleneck=8)
    # When the owner's segment or the top's stage is built
    # Then each refuses, saying what to change
    with pytest.raises(ValueError, match="flat cut"):
        assemble.owner_segment(cfg, 0, torch.randn(2, 784))
    with pytest.raises(ValueError, match="start with nn.Linear"):
        assemble.server_stage(cfg, 1, last=True, total_steps=lambda: 10, device="cpu")
    with pytest.raises(ValueError, match="probe"):
        assemble.owner_segment(JobConfig(bottleneck=8), 0)


def test_marvell_noise_lies_on_the_line_of_one_logit_gradients_spends_the_power_asked_and_sums_to_zero() -> None:
    # Given gradients on one line (as a one-logit top returns them), the classes 1.2 apart along
    # it with different spreads, one positive in five
    g = torch.Generator().manual_seed(1)
    labels = (torch.arange(4000) % 5 == 0).long()
    draws = torch.randn(4000, generator=g)
    along = torch.where(labels == 1, -1.0 + 0.3 * draws, 0.2 + 0.1 * draws)
    line = torch.tensor([0.6, -0.8, 0.0, 0.0], dtype=torch.float64)
    grads = along.double().unsqueeze(1) * line
    guard = MarvellNoise(scale=4.0, seed=3)
    # When it protects them, in batches of 400
    noise = torch.cat([guard.protect(grads[i:i + 400], labels[i:i + 400]) - grads[i:i + 400]
                       for i in range(0, 4000, 400)])
    # Then the noise stays on the line (the classes do not differ across it), each batch's noise
    # sums to zero, and its power per sample is 4 times the squared gap
    off_line = noise - (noise @ line).unsqueeze(1) * line
    assert float(off_line.abs().max()) < 1e-9
    assert float(noise.reshape(10, 400, 4).sum(1).abs().max()) < 1e-9
    assert float(noise.pow(2).sum(1).mean()) == pytest.approx(4 * 1.2 ** 2, rel=0.1)
    # And no protection is the identity
    assert NoProtection().protect(grads, labels) is grads


def test_marvells_covariances_spend_the_budget_and_beat_splitting_it_evenly() -> None:
    # Given batches whose classes spread differently along the gap and across it (d = 8, 1 in 5 positive)
    e = torch.eye(8, dtype=torch.float64)[0]
    cases = [Spread(1.0, 0.0, 0.0, 0.0, 0.0, 0.2), Spread(1.0, 0.05, 0.4, 0.01, 0.2, 0.2),
             Spread(1.0, 0.3, 0.1, 0.3, 0.05, 0.2)]
    for spread in cases:
        # When Marvell's covariances are chosen for power 4
        cov = optimal_covariances(e, spread, 4.0)
        # Then they spend exactly the budget, and do better on the bound than the same power given
        # to every sample along the gap
        assert 0.8 * (cov.a0 + 8 * cov.s0) + 0.2 * (cov.a1 + 8 * cov.s1) == pytest.approx(4.0, rel=1e-9)
        even = sum_kl(*(torch.tensor(x, dtype=torch.float64) for x in (4.0, 0.0, 4.0, 0.0)),
                      Spread(1.0, *(max(x, 1e-12) for x in (spread.along0, spread.along1, spread.across0,
                                                             spread.across1)), 0.2), 8)
        assert 0 <= cov.sum_kl <= float(even)
    # And noise in every direction goes only to the class that spreads less across the gap
    cov = optimal_covariances(e, cases[1], 4.0)
    assert cov.s1 == 0 and cov.s0 > 0


def one_logit_batches(count: int = 40, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of gradients as a one-logit top returns them, ``(sigmoid(f) - y) / B`` times its
    input weights (all on one line), about one positive in ten, the model mostly right."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)
    out = []
    for _ in range(count):
        y = (torch.rand(size, generator=g) < 0.1).long()
        logit = torch.randn(size, generator=g) * 2 + torch.where(y == 1, 2.0, -2.0)
        out.append((((torch.sigmoid(logit) - y) / size).unsqueeze(1) * w, y))
    return out


def label_leaks(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """The audit's three label attacks on these batches (leak AUC each)."""
    grads, positive = [gr for gr, _ in batches], [y > 0 for _, y in batches]
    cos, cos_labels = attacks.cosine_scores(grads, positive)
    return {"norm": attacks.leak_auc(attacks.norm_scores(grads), torch.cat(positive)),
            "cosine": attacks.leak_auc(cos, cos_labels),
            "direction": attacks.leak_auc(attacks.direction_scores(grads), torch.cat(positive))}


def test_marvell_at_the_presets_power_brings_the_no_label_direction_attack_to_chance() -> None:
    # Given a one-logit top's gradients, which give every label away to the direction attack
    batches = one_logit_batches()
    assert label_leaks(batches)["direction"] > 0.95
    # When Marvell protects them at power 4 and at the standard preset's power
    leaks = {}
    for scale in (4.0, PRIVACY_PRESETS[Privacy.STANDARD]["label_protection"]):
        guard = MarvellNoise(scale=scale, seed=1)
        leaks[scale] = label_leaks([(guard.protect(gr, y), y) for gr, y in batches])
    # Then power 4 still leaks to the direction attack, the preset's does not, and no attack
    # gets much beyond chance
    weak, strong = leaks[4.0], leaks[PRIVACY_PRESETS[Privacy.STANDARD]["label_protection"]]
    assert weak["direction"] > 0.57 > strong["direction"]
    assert strong["norm"] < 0.55 and strong["cosine"] < 0.55, strong


def test_marvell_noise_reuses_the_last_gap_for_a_batch_of_one_class() -> None:
    # Given a protection that has not yet seen both classes
    guard = MarvellNoise(scale=1.0)
    grads = torch.randn(8, 4)
    # When a batch of one class comes first, it goes out as computed
    assert torch.equal(guard.protect(grads, torch.zeros(8)), grads)
    # Then after a mixed batch, a one-class batch gets noise along the gap it saw
    guard.protect(torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]]), torch.tensor([1, 0]))
    noisy = guard.protect(grads, torch.zeros(8)) - grads
    assert float(noisy[:, 1:].abs().max()) < 1e-6 and float(noisy[:, 0].abs().max()) > 0


def test_the_privacy_preset_fills_defaults_and_an_explicit_setting_wins() -> None:
    # Given the standard preset on a binary job whose top keeps the labels, and one with its own width
    kept = JobConfig(privacy=Privacy.STANDARD, task=Task.BINARY, label_source=LabelSource.TOP)
    own = JobConfig(privacy=Privacy.STANDARD, bottleneck=32)
    # Then the preset's bottleneck and label protection are set, except where given explicitly,
    # and label protection only where the labels are kept from the owner
    assert kept.bottleneck == 16 and kept.label_protection > 0
    assert own.bottleneck == 32 and own.label_protection == 0
    assert JobConfig().bottleneck == 0 and JobConfig().agreed()["privacy"] == "off"


@pytest.mark.parametrize("settings, words", [
    ({"label_protection": 4.0}, "label_protection needs task = binary"),
    ({"label_protection": 4.0, "task": Task.BINARY}, "label_source = top"),
    ({"bottleneck": 8, "vertical_parts": 2, "bottom_sync": "independent", "label_source": "top"},
     "bottleneck is not available with vertical_parts"),
    ({"nopeek_lambda": -1.0}, "nopeek_lambda must be >= 0"),
    ({"cut_noise": float("nan")}, "cut_noise must be >= 0"),
])
def test_privacy_settings_that_cannot_work_are_refused_naming_the_field(settings: dict[str, object],
                                                                       words: str) -> None:
    # Given settings that cannot work together; when the job is built; then it is refused naming the field
    from splitmq.shared import config
    with pytest.raises(ConfigError, match=words):
        config.load(None, settings, environ={})
