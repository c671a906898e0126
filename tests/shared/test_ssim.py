"""SSIM, implemented once (shared.ssim), against a reference implementation's values."""
from __future__ import annotations

import pytest
import torch

from splitmq.shared.ssim import gaussian_window, ssim


def _pattern() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    i, j = torch.meshgrid(torch.arange(28, dtype=torch.float64), torch.arange(28, dtype=torch.float64),
                          indexing="ij")
    x = torch.sin(i / 3.0) * torch.cos(j / 4.0)
    y = 0.8 * x + 0.3 * torch.cos((i + 2 * j) / 5.0) - 0.1
    z = (x * 0.5 + ((i * 7 + j * 13) % 11) / 11.0 - 0.5).clamp(-1, 1)
    return x, y, z


def test_ssim_matches_the_reference_implementation_on_fixed_images() -> None:
    # Given two deterministic 28x28 image pairs whose SSIM scikit-image 0.26.0 computes as
    # structural_similarity(x, y, data_range=2.0, gaussian_weights=True, sigma=1.5,
    #                       use_sample_covariance=False) = 0.39649753860578296 and 0.2803320484067462
    x, y, z = _pattern()
    # When our SSIM scores them
    values = ssim(torch.stack([x, x]), torch.stack([y, z]), data_range=2.0)
    # Then it gives the reference values
    assert values.tolist() == pytest.approx([0.39649753860578296, 0.2803320484067462], abs=1e-9)


def test_an_image_is_identical_to_itself_and_constant_images_follow_the_closed_form() -> None:
    # Given an image, and two constant images (for which SSIM is the luminance term alone)
    x, _, _ = _pattern()
    a, b = torch.full((20, 20), 0.2, dtype=torch.float64), torch.full((20, 20), -0.4, dtype=torch.float64)
    # When SSIM compares each pair
    same = float(ssim(x, x, data_range=2.0))
    constant = float(ssim(a, b, data_range=2.0))
    # Then an image matches itself exactly, and the constants give (2ab + C1) / (a^2 + b^2 + C1)
    c1 = (0.01 * 2.0) ** 2
    assert same == pytest.approx(1.0, abs=1e-12)
    assert constant == pytest.approx((2 * 0.2 * -0.4 + c1) / (0.2 ** 2 + 0.4 ** 2 + c1), abs=1e-12)


def test_the_window_is_the_standard_eleven_tap_gaussian_and_bad_inputs_are_refused() -> None:
    # Given the default window
    g = gaussian_window()
    # Then it has 11 taps, sums to one and peaks in the middle with sigma 1.5
    assert len(g) == 11 and float(g.sum()) == pytest.approx(1.0)
    assert float(g[5] / g[6]) == pytest.approx(float(torch.exp(torch.tensor(1 / (2 * 1.5 ** 2), dtype=torch.float64))))
    # And images smaller than the window, or of different shapes, are refused
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(8, 8), torch.zeros(8, 8), data_range=1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(torch.zeros(28, 28), torch.zeros(27, 28), data_range=1.0)
