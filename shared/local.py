"""The unsplit baseline: the same model, data, batch order, loss and optimizer in one process.

Split training is judged against this: a synchronous one-owner run must reproduce its
per-step losses and final weights, and asynchronous runs must come close in its task
metric. The segments are built exactly as the parties build them and chained; a vertical
job's bottoms each see their own party's features and are joined as the top joins them.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from splitmq.shared import data, defaults, losses, models, schedule, scores
from splitmq.shared.config import Combine, JobConfig


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Compute with ``count`` torch threads inside, and the caller's count again after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class LocalResult:
    model: nn.Module
    segments: list[nn.Module]
    losses: list[float]
    test_scores: dict[str, float]
    samples_per_second: float

    @property
    def test_accuracy(self) -> float:
        return self.test_scores.get("accuracy", float("nan"))


class Chain(nn.Module):
    """Segments run one after the other (the split model in one process)."""

    def __init__(self, segments: Sequence[nn.Module]) -> None:
        super().__init__()
        self.segments = nn.ModuleList(segments)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for seg in self.segments:
            x = seg(x)
        return x


class VerticalChain(nn.Module):
    """Each party's bottom on its own features, joined, then the top."""

    def __init__(self, bottoms: Sequence[nn.Module], top: nn.Module, combine: Combine) -> None:
        super().__init__()
        self.bottoms, self.top, self.combine = nn.ModuleList(bottoms), top, combine

    def forward(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        outs = [b(x) for b, x in zip(self.bottoms, parts)]
        joined = torch.stack(outs).sum(0) if self.combine is Combine.SUM else torch.cat(outs, dim=1)
        out: torch.Tensor = self.top(joined)
        return out


def evaluate(model: nn.Module, test: data.SampleSet, task: str, loss_fn: losses.Loss, batch_size: int = 1024,
             inputs: Any = None) -> dict[str, float]:
    """Task metrics of ``model`` on ``test`` (``inputs`` overrides how a batch is fed, for vertical)."""
    scorer = scores.Scorer(task)
    with torch.no_grad():
        for rows in torch.split(torch.arange(len(test)), batch_size):
            batch = test.batch(rows)
            assert batch.y is not None
            out = model(inputs(rows) if inputs is not None else batch.x)
            scorer.update(out, batch.y, float(loss_fn(out, batch.y)))
    return scorer.result()


def train_local(cfg: JobConfig, samples: data.Data | None = None, *, client_index: int = 0,
                num_clients: int = 1, parties: Sequence[data.Data] | None = None,
                threads: int = defaults.TORCH_THREADS) -> LocalResult:
    """Train the unsplit model on owner ``client_index``'s data (of ``num_clients``; default all)
    with the batch order that owner uses, the job's optimizer, loss and schedule, on ``threads``
    torch threads (default: as many as a party uses, so the sums run in the same order).

    A vertical job takes each party's data (``parties``; default: built from the job) and the
    label holder's (``samples``; default: the job's ``data``).
    """
    with torch_threads(threads):
        if cfg.vertical_parts:
            return _train_vertical(cfg, parties, samples)
        return _train(cfg, samples, client_index, num_clients)


def _train(cfg: JobConfig, samples: data.Data | None, client_index: int, num_clients: int) -> LocalResult:
    samples = samples or data.load(cfg.data, data_dir=cfg.data_dir, test_fraction=cfg.test_fraction,
                                   client_index=client_index, num_clients=num_clients)
    segments = models.build_segments(cfg.model, cfg.cuts, cfg.seed, count=cfg.segment_count)
    model = Chain(segments)
    loss_fn = losses.resolve(cfg.loss)
    train = samples.train
    per_epoch = data.batches_per_epoch(len(train), cfg.batch_size)
    def batches(epoch: int) -> list[tuple[Any, Any]]:
        order = data.batch_order(len(train), cfg.batch_size, cfg.seed + client_index, epoch)
        return [(b.x, b.y) for b in (train.batch(rows) for rows in order)]

    test = samples.test
    return _loop(cfg, model, segments, loss_fn, per_epoch, batches,
                 lambda: evaluate(model, test, cfg.task.value, loss_fn) if test is not None else {}, len(train))


def _loop(cfg: JobConfig, model: nn.Module, segments: list[nn.Module], loss_fn: losses.Loss, per_epoch: int,
          batches: Any, evaluation: Any, num_samples: int) -> LocalResult:
    opt_spec = cfg.optimizer_spec
    optimizers = [opt_spec.build(seg.parameters()) for seg in segments]   # one per segment, as the parties have
    bases = [[g["lr"] for g in o.param_groups] for o in optimizers]
    lr_at = schedule.make(cfg.lr_schedule.value, cfg.epochs * per_epoch)
    recorded: list[float] = []
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        for x, y in batches(epoch):
            loss = loss_fn(model(x), y)
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            factor = lr_at(len(recorded))
            for o, base in zip(optimizers, bases):
                for group, b in zip(o.param_groups, base):
                    group["lr"] = b * factor
                o.step()
            recorded.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    return LocalResult(model, segments, recorded, evaluation(), cfg.epochs * num_samples / seconds)


def _train_vertical(cfg: JobConfig, given: Sequence[data.Data] | None, held: data.Data | None) -> LocalResult:
    from splitmq.workers import assemble  # the same data and segments the parties build

    parties = list(given) if given is not None else [assemble.owner_data(cfg, i) for i in range(cfg.vertical_parts)]
    held = held if held is not None else assemble.own_data(cfg)
    if cfg.align.value == "psi":  # every party keeps the ids all hold, split as the label holder splits them
        parties = [_aligned(p, parties, held) for p in parties]
    bottoms = [assemble.segment(cfg, 0, party=i) for i in range(cfg.vertical_parts)]
    top = models.build_part(assemble.model_name(cfg), 1, cfg.cuts, cfg.seed, count=2, parties=cfg.vertical_parts)
    model = VerticalChain(bottoms, top, cfg.combine)
    loss_fn = losses.resolve(cfg.loss)
    labels = assemble.top_labels(cfg, own=held)
    train = parties[0].train
    per_epoch = data.batches_per_epoch(len(train), cfg.batch_size)

    def feed(split: str, rows: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for p in parties:
            s = p.train if split == "train" else p.test
            assert s is not None
            x = s.batch(rows).x
            assert x is not None
            out.append(x)
        return out

    def batches(epoch: int) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        out = []
        for rows in data.batch_order(len(train), cfg.batch_size, cfg.seed, epoch):
            ids = train.ids[rows]
            y = labels.for_batch(_ids_only(ids))
            out.append((feed("train", rows), y))
        return out

    test = parties[0].test
    assert test is not None
    test_with_labels = data.SampleSet(None, labels.for_batch(_ids_only(test.ids)), test.ids)
    return _loop(cfg, model, [*bottoms, top], loss_fn, per_epoch, batches,
                 lambda: evaluate(model, test_with_labels, cfg.task.value, loss_fn,
                                  inputs=lambda rows: feed("test", rows)), len(train))


def _aligned(party: data.Data, parties: Sequence[data.Data], held: data.Data) -> data.Data:
    common = data.pool(held).ids
    for p in parties:
        common = common[torch.isin(common, data.pool(p).ids)]
    train = torch.sort(common[torch.isin(common, held.train.ids)]).values
    held_test = held.test.ids if held.test is not None else torch.empty(0, dtype=torch.int64)
    test = torch.sort(common[torch.isin(common, held_test)]).values
    pool = data.pool(party)
    return data.Data(pool.only(train), pool.only(test) if len(test) else None)


def _ids_only(ids: torch.Tensor) -> Any:
    from splitmq.shared import wire
    return wire.Forward(job_id="local", client_id="local", seq=0, activations=torch.empty(len(ids), 0),
                        sample_ids=ids)
