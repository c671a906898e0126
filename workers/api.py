"""The Python API (``import splitmq``): a job described with the user's own PyTorch objects.

    import splitmq
    job = splitmq.job(job_id="hospital", model=build, cuts=["features"], loss="bce_with_logits",
                      task="binary", optimizer="AdamW", lr=1e-3, epochs=5)
    splitmq.run_server(job)                                 # on the machine with the top
    splitmq.run_worker(job, data=my_data, client_index=0)   # on each data owner's machine
    splitmq.train_local(job, data=my_data)                  # the same model in one process

Objects (a model factory, an ``nn.Module`` or a list of segments, a loss, an optimizer class)
are named by their import path, which is what the parties compare when they join; each party
hands its own objects to its own call (or names them in the job's TOML), so nothing but data
ever crosses the broker. ``run_worker`` and ``run_server`` run the same party loop as the
``splitmq worker`` / ``splitmq server`` commands and return how it ended.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from splitmq.shared import config, data, defaults, local, topology
from splitmq.shared.broker import Broker
from splitmq.shared.loader import register
from splitmq.shared.metrics import Metrics, serve
from splitmq.workers import assemble, runtime, server, worker
from splitmq.workers.party import Outcome, Party
from splitmq.workers.roles.owner_waits import OwnerTimeouts
from splitmq.workers.stats import Stats

#: Settings that may be given as objects rather than names.
_OBJECT_SETTINGS = ("model", "loss", "optimizer")


def job(**settings: Any) -> config.JobConfig:
    """A job from keyword settings (the fields of ``JobConfig``, docs/api.md).

    ``model`` may be a factory, an ``nn.Module`` (an ``nn.Sequential`` cut by ``cuts``) or a
    list of segment modules; ``loss`` a callable; ``optimizer`` a ``torch.optim`` class;
    ``optimizer_args`` a dict. A ``config`` key names a TOML file to start from.

    Raises:
        ConfigError: an unknown setting or a bad value, with a one-line reason.
    """
    path = settings.pop("config", None)
    for key in _OBJECT_SETTINGS:
        value = settings.get(key)
        if value is not None and not isinstance(value, str):
            settings[key] = register(value)
    if isinstance(settings.get("optimizer_args"), Mapping):
        settings["optimizer_args"] = tuple(sorted(settings["optimizer_args"].items()))
    return config.load(path, settings, environ={})


def as_data(samples: Any) -> data.Data:
    """``Data``, a ``(train, test)`` pair of SampleSets/Datasets, or one Dataset (train only)."""
    return data.as_data(samples)


def run_worker(cfg: config.JobConfig, *, data: Any = None, client_index: int = 0, client_id: str = "",
               amqp_url: str = config.DEFAULT_AMQP_URL, tls: Mapping[str, str] | None = None,
               checkpoint_dir: str | None = None, device: str = "cpu", evaluate: bool = True,
               metrics_port: int | None = None, timeouts: OwnerTimeouts = OwnerTimeouts(),
               stop: Any = None, run_dir: str | None = None) -> Outcome:
    """Run one data owner to the end of the job (or a named exit); returns how it ended.

    Its trained bottom (and head) is kept in ``run_dir`` (default ``runs/<job_id>``) for
    ``splitmq predict`` and ``splitmq export``.
    """
    name, index = worker.identity(client_id, client_index, cfg)
    stats = Stats(Metrics("worker", _registry(), job_id=cfg.job_id))
    opts = worker.WorkerOptions(client_id=name, client_index=index, device=device, checkpoint_dir=checkpoint_dir,
                                evaluate=evaluate, timeouts=timeouts, run_dir=run_dir or f"runs/{cfg.job_id}",
                                data=as_data(data) if data is not None else None)
    roles, loop = worker.build(cfg, opts, stats)
    loop = dataclasses.replace(loop, user_id=runtime.broker_username(amqp_url))
    transport = Broker(amqp_url, name=name, tls=tls, lease=topology.lease_queue(cfg.job_id, name),
                       prefetch=cfg.checkpoint_every + cfg.max_in_flight + 64, on_reconnect=stats.reconnected)
    return _run(Party(roles, transport, loop, stats=stats, stop=stop or (lambda: False)), metrics_port, stats)


def run_server(cfg: config.JobConfig, *, stage: str = "", data: Any = None,
               amqp_url: str = config.DEFAULT_AMQP_URL, tls: Mapping[str, str] | None = None,
               checkpoint_dir: str | None = None, device: str = "cpu", serve_forever: bool = False,
               metrics_port: int | None = None, stop: Any = None, **options: Any) -> Outcome:
    """Run a stage after the bottom (the top by default) until every owner is done; returns how it ended.

    ``data``: this party's own samples when it holds the labels (``label_source = "top"``).
    ``options``: more ``ServerOptions`` (``idle_timeout_s``, ``serve``, ``run_dir``, ...); the trained
    segment is kept in ``run_dir`` (default ``runs/<job_id>``).
    """
    options.setdefault("run_dir", f"runs/{cfg.job_id}")
    name = stage or cfg.stages[0]
    stats = Stats(Metrics("trainer" if name == cfg.stages[-1] else "stage", _registry(), job_id=cfg.job_id))
    opts = server.ServerOptions(stage=name, device=device, checkpoint_dir=checkpoint_dir, serve_forever=serve_forever,
                                data=as_data(data) if data is not None else None, **options)
    roles, loop = server.build(cfg, opts, stats)
    transport = Broker(amqp_url, name=name, tls=tls, lease=topology.lease_queue(cfg.job_id, name), prefetch=256,
                       on_reconnect=stats.reconnected)
    return _run(Party(roles, transport, loop, stats=stats, stop=stop or (lambda: False)), metrics_port, stats)


def train_local(cfg: config.JobConfig, *, data: Any = None, parties: Any = None,
                threads: int = defaults.TORCH_THREADS) -> local.LocalResult:
    """The unsplit baseline: the same model, data order, loss and optimizer in this process, on as
    many torch threads as a party uses (the caller's count is restored after).

    A vertical job takes each party's data as ``parties`` and the label holder's as ``data``.
    """
    return local.train_local(cfg, as_data(data) if data is not None else None,
                             parties=[as_data(p) for p in parties] if parties is not None else None, threads=threads)


def _registry() -> Any:
    from prometheus_client import CollectorRegistry
    return CollectorRegistry()  # one per party: several may run in one process


def _run(party: Party, metrics_port: int | None, stats: Stats) -> Outcome:
    if metrics_port is not None and stats.metrics is not None:
        serve(metrics_port, stats.metrics.registry)
    return party.run()


def configure(threads: int = defaults.TORCH_THREADS, device: str = "cpu") -> None:
    """Torch threads for this process's segment (and a clear error for a device it lacks)."""
    assemble.configure_process(threads, device)


__all__ = ["job", "run_worker", "run_server", "train_local", "as_data", "configure"]
