"""The user's own model and data: cutting by submodule name, factories by import path, sample sets."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from splitmq.shared import data, models


def test_a_sequential_is_cut_after_the_named_children_and_keeps_their_names() -> None:
    net = nn.Sequential(OrderedDict([("features", nn.Linear(4, 3)), ("act", nn.ReLU()), ("head", nn.Linear(3, 2))]))
    bottom, top = models.split_sequential(net, ["act"])
    assert list(dict(bottom.named_children())) == ["features", "act"] and list(dict(top.named_children())) == ["head"]
    x = torch.randn(5, 4)
    assert torch.equal(top(bottom(x)), net(x))
    with pytest.raises(ValueError, match="must name children"):
        models.split_sequential(net, ["nope"])
    with pytest.raises(ValueError, match="need an nn.Sequential"):
        models.split_sequential(nn.Linear(2, 2), ["x"])


def test_every_party_building_the_whole_model_from_the_seed_gets_the_same_segments() -> None:
    a = models.build_segments("mlp", (), seed=3)
    b = models.build_part("mlp", 1, (), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a[1].state_dict().values(), b.state_dict().values()))


def test_a_factory_taking_a_part_builds_only_that_part() -> None:
    calls: list[str] = []

    def factory(part: str) -> nn.Module:
        calls.append(part)
        return nn.Linear(2, 2)
    import sys
    import types
    mod = types.ModuleType("splitmq_test_factory")
    mod.build = factory  # type: ignore[attr-defined]
    sys.modules["splitmq_test_factory"] = mod
    models.build_part("splitmq_test_factory:build", 1, count=3)
    assert calls == ["middle"]
    assert models.part_names(2) == ["bottom", "top"] and models.part_names(4) == ["bottom", "middle1", "middle2", "top"]


def test_sample_sets_keep_ids_through_shards_and_batches_and_refuse_duplicates() -> None:
    samples = data.SampleSet(torch.arange(10.0).view(10, 1), torch.arange(10) % 2, torch.arange(100, 110))
    shard = data.shard(samples, 1, 3)
    assert shard.ids.tolist() == [101, 104, 107]
    batch = shard.batch(torch.tensor([2, 0]))
    assert batch.ids.tolist() == [107, 101] and batch.x is not None and batch.x.view(-1).tolist() == [7.0, 1.0]
    assert samples.only(torch.tensor([105, 100])).ids.tolist() == [105, 100]
    with pytest.raises(ValueError, match="unique"):
        data.SampleSet(torch.zeros(2, 1), None, [1, 1])
    with pytest.raises(ValueError, match="out of range"):
        data.shard(samples, 3, 3)


def test_a_torch_dataset_of_pairs_is_batched_by_collation() -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 0]))
    samples = data.SampleSet(ds)
    batch = samples.batch(torch.tensor([2, 1]))
    assert batch.x is not None and batch.x.tolist() == [[4.0, 5.0], [2.0, 3.0]]
    assert batch.y is not None and batch.y.tolist() == [0, 1] and batch.ids.tolist() == [2, 1]


def test_a_data_factory_is_called_with_what_it_accepts_and_a_wrong_return_is_named() -> None:
    import sys
    import types
    mod = types.ModuleType("splitmq_test_data")
    mod.good = lambda client_index: (data.SampleSet(torch.zeros(4, 1) + client_index),  # type: ignore[attr-defined]
                                     None)
    mod.bad = lambda: 42  # type: ignore[attr-defined]
    sys.modules["splitmq_test_data"] = mod
    got = data.load("splitmq_test_data:good", client_index=2)
    assert got.train.x is not None and float(got.train.x[0, 0]) == 2.0 and got.test is None
    with pytest.raises(ValueError, match="must return splitmq.Data"):
        data.load("splitmq_test_data:bad")
    with pytest.raises(ValueError, match="needs --data-dir"):
        data.load("mnist", data_dir="/nonexistent")
