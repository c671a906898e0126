"""Building a party's pieces from the job: its data, its segment as a Stage, its join spec.

Used once at start by ``splitmq worker`` and ``splitmq server`` (and by tests that run
parties in-process); nothing here runs per message.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from splitmq.shared import data, io_tuning, losses, models, privacy, schedule, staleness
from splitmq.shared.config import JobConfig, LabelSource
from splitmq.shared.label_protection import GradientProtection, MarvellNoise, NoProtection
from splitmq.shared.stage import Stage
from splitmq.workers.roles.top import Labels


def configure_process(threads: int, device: str) -> None:
    """How this process computes: its segment's threads, a heap kept for the next message
    (``io_tuning.keep_freed_memory``), and a clear error for a device it does not have.

    Raises:
        ValueError: a CUDA device on a machine without one (or an index it does not have).
    """
    torch.set_num_threads(max(1, threads))
    io_tuning.keep_freed_memory()
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


def probe(samples: data.Data) -> torch.Tensor:
    """Two of the owner's training inputs: what its segment is shown to learn its cut's shape."""
    first = samples.train.batch(torch.arange(min(2, len(samples.train))))
    assert first.x is not None
    return first.x


def owner_segment(cfg: JobConfig, index: int, probe: torch.Tensor | None = None) -> torch.nn.Module:
    """The owner's segment with the job's defences at the cut: a bottleneck layer, then noise.

    Raises:
        ValueError: a bottleneck without a probe batch, or on a cut it cannot narrow.
    """
    seg = segment(cfg, 0, party=index)
    if cfg.bottleneck:
        if probe is None:
            raise ValueError("bottleneck: the owner's segment needs a probe batch to learn its cut width")
        seg.eval()  # a probe must not move batch-norm statistics
        with torch.no_grad():
            features = privacy.cut_features(seg(probe))
        seg.train()
        seg = privacy.Bottleneck(seg, features, cfg.bottleneck, seed=cfg.seed)
    if cfg.cut_noise:
        privacy.CutNoise(cfg.cut_noise).attach(seg)
    return seg


def bottom_stage(cfg: JobConfig, index: int, num_train: int, device: str,
                 local_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, *,
                 probe: torch.Tensor | None = None, report: Callable[[float], None] | None = None) -> Stage:
    """The owner's stage; with ``nopeek_lambda`` its local loss is NoPeek (``report`` gets each dCor)."""
    per_epoch = data.batches_per_epoch(num_train, cfg.batch_size)
    stage = Stage(owner_segment(cfg, index, probe), optimizer=cfg.optimizer_spec, input_grad=False,
                  schedule=schedule.make(cfg.lr_schedule.value, cfg.epochs * per_epoch),
                  correction=staleness.make(cfg.staleness.value, dc_lambda=cfg.dc_lambda),
                  stash_weights=cfg.max_in_flight > 1, device=device, local_loss=local_loss)
    if local_loss is None and cfg.nopeek_lambda:
        stage.local_loss = privacy.NoPeek(weight=cfg.nopeek_lambda, warmup_steps=cfg.nopeek_warmup_epochs * per_epoch,
                                          progress=lambda: stage.version, report=report)
    return stage


def server_stage(cfg: JobConfig, index: int, *, last: bool, total_steps: Callable[[], int], device: str) -> Stage:
    """A non-bottom segment: the last holds the loss; a middle one stashes weights (batches overlap).
    The first one's first layer takes the job's bottleneck width, if it has one."""
    count = 2 if cfg.vertical_parts else cfg.segment_count
    seg = (segment(cfg, index) if not cfg.vertical_parts else
           models.build_part(model_name(cfg), 1, cfg.cuts, cfg.seed, count=count, parties=cfg.vertical_parts))
    if cfg.bottleneck and index == 1:
        seg = privacy.narrow_input(seg, cfg.bottleneck, seed=cfg.seed)
    return Stage(seg, optimizer=cfg.optimizer_spec, stash_weights=not last,
                 schedule=schedule.make(cfg.lr_schedule.value, total_steps),
                 loss=losses.resolve(cfg.loss) if last else None, device=device)


def label_protection(cfg: JobConfig) -> GradientProtection:
    """What the party with the loss does to the gradients it returns (``label_protection``)."""
    if cfg.label_protection:
        return MarvellNoise(scale=cfg.label_protection, seed=cfg.seed)
    return NoProtection()


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


def own_data(cfg: JobConfig) -> data.Data:
    """A server's own samples (the labels it holds), from the job's ``data`` setting."""
    return data.load(cfg.data, data_dir=cfg.data_dir, test_fraction=cfg.test_fraction)


def top_labels(cfg: JobConfig, own: data.Data | None = None) -> Labels:
    """Labels for the loss: from each batch, or this party's own samples by id (label_source top)."""
    if cfg.label_source is LabelSource.BATCH and not cfg.u_shaped:
        return Labels()
    held = own if own is not None else own_data(cfg)
    parts = [s for s in (held.train, held.test) if s is not None and s.y is not None]
    if not parts:
        raise ValueError(f"label_source top: data {cfg.data!r} of this party holds no labels")
    return Labels(values=torch.cat([s.y for s in parts if s.y is not None]), ids=torch.cat([s.ids for s in parts]))
