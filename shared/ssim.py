"""Structural similarity (SSIM), implemented once, as Wang et al. (2004) define it.

The privacy audit scores a reconstruction attack by the SSIM between each reconstructed
image and the real one. Standard parameters: an 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, population (not sample) variances, and the mean of the SSIM map over
the positions where the whole window fits in the image (what scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
reports, and MATLAB's reference ``ssim_index`` with its ``'valid'`` filtering).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``size`` taps (the 2-D window is its outer product)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be odd and >= 1, got {size}")
    taps = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(taps ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter(images: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, valid positions only: (N, 1, H, W) -> (N, 1, H-k+1, W-k+1)."""
    k = len(g)
    out = F.conv2d(images, g.view(1, 1, k, 1))
    return F.conv2d(out, g.view(1, 1, 1, k))


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float, size: int = WINDOW,
         sigma: float = SIGMA) -> torch.Tensor:
    """SSIM of each image pair: one value per image.

    Args:
        x, y: grey images, (N, H, W) or (H, W); any float dtype (computed in float64).
        data_range: max - min of the pixel scale (2.0 for images in [-1, 1], 1.0 for [0, 1]).
        size, sigma: the Gaussian window (default the standard 11 and 1.5).

    Returns:
        (N,) float64 tensor (a 0-d tensor for one (H, W) pair).

    Raises:
        ValueError: shapes differ, or the images are smaller than the window.
    """
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} and {tuple(y.shape)}")
    single = x.dim() == 2
    a = x.reshape(-1, 1, *x.shape[-2:]).double()                 # (N, 1, H, W)
    b = y.reshape(-1, 1, *y.shape[-2:]).double()
    if min(a.shape[-2:]) < size:
        raise ValueError(f"images of {tuple(a.shape[-2:])} are smaller than the {size}x{size} window")
    g = gaussian_window(size, sigma).to(a.device)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_a, mu_b = _filter(a, g), _filter(b, g)
    var_a = _filter(a * a, g) - mu_a ** 2
    var_b = _filter(b * b, g) - mu_b ** 2
    cov = _filter(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    per_image = (num / den).mean(dim=(1, 2, 3))                  # (N,)
    return per_image[0] if single else per_image
