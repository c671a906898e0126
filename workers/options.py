"""Command-line options: the job's flags generated from ``JobConfig``'s fields, and each party's own.

One list of fields (``shared.config.JobConfig``) gives the TOML keys, the ``SPLITMQ_*``
environment variables, the flags and the agreed spec, so they cannot drift apart. Flags
default to None: a flag that is not given leaves the file's or the environment's value.
"""
from __future__ import annotations

import argparse
import os
from enum import Enum
from typing import Any

from splitmq.shared import config, defaults

#: Options every party takes that are not part of the job: where the broker is, how long to wait.
CONNECTION_HELP = "broker URL(s), comma-separated for a cluster (env AMQP_URL); amqps:// for TLS"


def add_job_options(p: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per job field (``--batch-size``, ``--optimizer``, ...)."""
    g = p.add_argument_group("job (a TOML file, SPLITMQ_<FIELD> env vars, or these flags; see docs/api.md)")
    g.add_argument("--config", help="job TOML file shared by the parties (docs/api.md lists its keys)")
    for name, f in config.FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default = f.default
        kwargs: dict[str, Any] = {"dest": name, "default": None, "metavar": _metavar(default),
                                  "help": f"{f.metadata['help']} (default: {_show(default)})"}
        if isinstance(default, Enum):
            kwargs["choices"] = [e.value for e in type(default)]
            kwargs.pop("metavar")
        g.add_argument(flag, **kwargs)


def _metavar(default: Any) -> str:
    if isinstance(default, tuple):
        return "A,B"
    return {int: "N", float: "X"}.get(type(default), "TEXT")


def _show(default: Any) -> str:
    if isinstance(default, Enum):
        return str(default.value)
    if isinstance(default, tuple):
        return ",".join(str(v) if not isinstance(v, tuple) else f"{v[0]}={v[1]}" for v in default) or "none"
    return repr(default) if isinstance(default, str) else str(default)


def add_connection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker")
    g.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", config.DEFAULT_AMQP_URL), help=CONNECTION_HELP)
    g.add_argument("--tls-ca", default=os.environ.get("SPLITMQ_TLS_CA"), help="CA bundle to verify the broker")
    g.add_argument("--tls-cert", default=os.environ.get("SPLITMQ_TLS_CERT"), help="client certificate (PEM)")
    g.add_argument("--tls-key", default=os.environ.get("SPLITMQ_TLS_KEY"), help="client key (PEM)")
    g.add_argument("--broker-timeout", type=float, default=defaults.BROKER_TIMEOUT_S,
                   help="seconds to keep trying to reach the broker, at start or after losing it")


def add_party_options(p: argparse.ArgumentParser) -> None:
    """What every long-running party takes besides the job: where it keeps state, metrics, threads."""
    g = p.add_argument_group("this party")
    g.add_argument("--checkpoint-dir", help="durable state: a restarted party resumes from it without "
                                            "losing or repeating a batch")
    g.add_argument("--run-dir", help="where history-<party>.jsonl is written (default runs/<job>)")
    g.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics here (0 = any free port)")
    g.add_argument("--summary-json", help="write the run summary here when done")
    g.add_argument("--metrics-linger", type=float, default=15.0,
                   help="after a clean finish, keep /metrics up this long so Prometheus sees it finished "
                        "(no alert for an endpoint that went away after a clean run); set your scrape interval")
    g.add_argument("--device", default="cpu", help="torch device for this party's segment: cpu, cuda, cuda:N")
    g.add_argument("--torch-threads", type=int, default=defaults.TORCH_THREADS,
                   help=f"CPU threads for this party's segment (default {defaults.TORCH_THREADS}: small devices, "
                        "predictable timing, and the sums local training makes)")
    g.add_argument("--lease-timeout", type=float, default=defaults.LEASE_TIMEOUT_S,
                   help="seconds to wait while another party of this name holds it (a standby trainer "
                        "sets this high to take over when the active one dies)")


def job_config(args: argparse.Namespace) -> config.JobConfig:
    """Defaults < config file < SPLITMQ_* env < flags.

    Raises:
        ConfigError: one line naming the bad key or flag.
    """
    return config.load(args.config, {name: getattr(args, name, None) for name in config.FIELDS})


def tls_options(args: argparse.Namespace) -> dict[str, str]:
    return {k: v for k, v in (("ca", args.tls_ca), ("cert", args.tls_cert), ("key", args.tls_key)) if v}
