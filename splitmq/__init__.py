"""splitmq: asynchronous split learning over RabbitMQ.

    import splitmq
    job = splitmq.job(job_id="hospital", model=build, cuts=["features"], loss="bce_with_logits",
                      task="binary", optimizer="AdamW", lr=1e-3, epochs=5)
    splitmq.run_server(job)                                 # the party with the top
    splitmq.run_worker(job, data=my_data, client_index=0)   # each data owner
    splitmq.train_local(job, data=my_data)                  # the same model in one process

docs/api.md has every setting. Names are imported on first use, so ``import splitmq`` (and
the ``splitmq`` command's help) costs no torch import.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.2.0"

#: Public name -> "module:attribute" it comes from.
_EXPORTS = {
    "job": "splitmq.workers.api:job",
    "run_worker": "splitmq.workers.api:run_worker",
    "run_server": "splitmq.workers.api:run_server",
    "train_local": "splitmq.workers.api:train_local",
    "configure": "splitmq.workers.api:configure",
    "JobConfig": "splitmq.shared.config:JobConfig",
    "Data": "splitmq.shared.data:Data",
    "SampleSet": "splitmq.shared.data:SampleSet",
    "Outcome": "splitmq.workers.party:Outcome",
    "ExitReason": "splitmq.workers.exits:ExitReason",
    "ConfigError": "splitmq.shared.errors:ConfigError",
}
__all__ = sorted(_EXPORTS)


def shipped(*parts: str) -> Path:
    """A file shipped with splitmq (``broker_config/``, ``deploy/``): inside the package when it
    was installed from a wheel, at the repository's root in a checkout.

    Raises:
        FileNotFoundError: neither place has it.
    """
    here = Path(__file__).resolve().parent
    for base in (here, here.parent):
        candidate = base.joinpath(*parts)
        if candidate.exists():
            return candidate
    raise FileNotFoundError("/".join(parts) + " is not shipped with this installation of splitmq")


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'splitmq' has no attribute {name!r}")
    module, _, attribute = _EXPORTS[name].partition(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
