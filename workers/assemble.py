"""Building a party's pieces from the job: its data, its segment as a Stage, its join spec.

Used once at start by ``splitmq worker`` and ``splitmq server`` (and by tests that run
parties in-process); nothing here runs per message.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from splitmq.shared import data, losses, models, schedule, staleness
from splitmq.shared.config import JobConfig, LabelSource
from splitmq.shared.stage import Stage
from splitmq.workers.roles.top import Labels


def configure_torch(threads: int, device: str) -> None:
    """Threads for this process's segment, and a clear error for a device it does not have.

    Raises:
        ValueError: a CUDA device on a machine without one (or an index it does not have).
    """
    torch.set_num_threads(max(1, threads))
    dev = torch.device(device)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         "use --device cpu")


def owner_data(cfg: JobConfig, index: int) -> data.Data:
    """A data owner's samples: its shard of a built-in set, or what its own factory returns.

    Raises:
        ValueError: index out of range, unusable data; the message says what to change.
    """
    if cfg.vertical_parts:  # every party holds every sample, but only its own block of features
        if cfg.data not in data.BUILTIN:
            return data.load(cfg.data, data_dir=cfg.data_dir, test_fraction=cfg.test_fraction,
                             client_index=index, num_clients=cfg.vertical_parts)
        if not 0 <= index < cfg.vertical_parts:
            raise ValueError(f"client index {index} is out of range for {cfg.vertical_parts} vertical parties")
        full = data.load(cfg.data, data_dir=cfg.data_dir, test_fraction=cfg.test_fraction)
        columns = models.column_groups(cfg.vertical_parts)[index]
        return data.Data(_columns(full.train, columns), _columns(full.test, columns) if full.test else None)
    return data.load(cfg.data, data_dir=cfg.data_dir, test_fraction=cfg.test_fraction, client_index=index,
                     num_clients=cfg.num_clients)


def _columns(samples: data.SampleSet, columns: torch.Tensor) -> data.SampleSet:
    assert isinstance(samples.x, torch.Tensor)
    return data.SampleSet(samples.x[:, columns], samples.y, samples.ids)


def model_name(cfg: JobConfig) -> str:
    return "vertical_mlp" if cfg.vertical_parts and cfg.model == "mlp" else cfg.model


def segment(cfg: JobConfig, index: int, party: int = 0) -> torch.nn.Module:
    """Segment ``index`` of the job's chain (0 = the bottom), built the way every party builds it."""
    count = 2 if cfg.vertical_parts else cfg.segment_count
    return models.build_part(model_name(cfg), index, cfg.cuts, cfg.seed, count=count, party=party,
                             parties=max(1, cfg.vertical_parts))


def bottom_stage(cfg: JobConfig, index: int, num_train: int, device: str,
                 local_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Stage:
    total = cfg.epochs * data.batches_per_epoch(num_train, cfg.batch_size)
    return Stage(segment(cfg, 0, party=index), optimizer=cfg.optimizer_spec, input_grad=False,
                 schedule=schedule.make(cfg.lr_schedule.value, total),
                 correction=staleness.make(cfg.staleness.value, dc_lambda=cfg.dc_lambda),
                 stash_weights=cfg.max_in_flight > 1, device=device, local_loss=local_loss)


def server_stage(cfg: JobConfig, index: int, *, last: bool, total_steps: Callable[[], int], device: str) -> Stage:
    """A non-bottom segment: the last holds the loss; a middle one stashes weights (batches overlap)."""
    count = 2 if cfg.vertical_parts else cfg.segment_count
    return Stage(segment(cfg, index) if not cfg.vertical_parts else
                 models.build_part(model_name(cfg), 1, cfg.cuts, cfg.seed, count=count,
                                   parties=cfg.vertical_parts),
                 optimizer=cfg.optimizer_spec, stash_weights=not last,
                 schedule=schedule.make(cfg.lr_schedule.value, total_steps),
                 loss=losses.resolve(cfg.loss) if last else None, device=device)


def owner_spec(cfg: JobConfig, stage: Stage, samples: data.Data) -> dict[str, Any]:
    """What must agree at the join: the job's agreed settings and this owner's model fingerprint."""
    first = samples.train.batch(torch.arange(min(2, len(samples.train))))
    assert first.x is not None
    out = stage.infer(first.x)                                   # (2, *cut_shape)
    return {**cfg.agreed(), "cut_shape": list(out.shape[1:]), "cut_dtype": str(out.dtype).replace("torch.", ""),
            "bottom_params": models.parameter_shapes(stage.segment)}


def accepts_cut(stage: Stage) -> Callable[[dict[str, Any]], str]:
    """Whether this stage's segment takes activations of an owner's cut shape ("" if it does)."""
    def check(spec: dict[str, Any]) -> str:
        shape = spec.get("cut_shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
            return f"cut_shape: {shape!r} is not a shape"
        try:
            stage.infer(torch.zeros(2, *shape))
        except Exception as exc:  # any error means the segment cannot take this input
            return f"cut_shape: this stage's segment cannot take activations of shape {shape}: {exc}"
        return ""
    return check


def top_labels(cfg: JobConfig, own: data.Data | None = None) -> Labels:
    """Labels for the loss: from each batch, or this party's own samples by id (label_source top)."""
    if cfg.label_source is LabelSource.BATCH and not cfg.u_shaped:
        return Labels()
    held = own if own is not None else data.load(cfg.data, data_dir=cfg.data_dir, test_fraction=cfg.test_fraction)
    parts = [s for s in (held.train, held.test) if s is not None and s.y is not None]
    if not parts:
        raise ValueError(f"label_source top: data {cfg.data!r} of this party holds no labels")
    return Labels(values=torch.cat([s.y for s in parts if s.y is not None]), ids=torch.cat([s.ids for s in parts]))
