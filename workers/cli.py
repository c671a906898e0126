"""The ``splitmq`` command. Each sub-command lives in its own module with a ``register``.

Only the module of the command being run is imported (``splitmq --help`` and ``splitmq
status`` import no torch). Global options (``--log-level``) are accepted before or after the
sub-command. Exit codes (docs/cli.md): 0 done, 1 failed, 2 usage, 3 configuration,
69 broker unavailable, 75 a peer was silent (retry later), 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from typing import TYPE_CHECKING

from splitmq import __version__
from splitmq.shared.errors import ConfigError
from splitmq.workers import runtime

if TYPE_CHECKING:
    from splitmq.workers.party import Party

log = logging.getLogger("splitmq")

#: Sub-command -> (module with ``register(subparsers)``, one-line help for ``splitmq --help``).
COMMANDS: dict[str, tuple[str, str]] = {
    "worker": ("splitmq.workers.worker", "run a data owner's bottom segment"),
    "server": ("splitmq.workers.server", "serve a stage after the bottom: the top with the loss, or a middle hop"),
    "demo": ("splitmq.workers.demo", "train the default model split across local processes, beside a local baseline"),
    "broker": ("splitmq.workers.broker_admin", "broker topology and users"),
    "job": ("splitmq.workers.job_admin", "manage a job's broker objects (job delete)"),
    "status": ("splitmq.workers.status", "terminal view of a run: clients, throughput, loss, queues, dead letters"),
    "plot": ("splitmq.workers.plot", "PNG of loss and test metrics over time per party, from a run's history"),
    "predict": ("splitmq.workers.predict_cli", "a data owner's predictions through the split model"),
    "export": ("splitmq.workers.export", "assemble the whole trained model, with every holder's consent"),
    "approve-export": ("splitmq.workers.consent", "as a segment holder, let a requester export the whole model"),
    "audit": ("splitmq.workers.audit", "attack a trained job to measure what it leaks (privacy report)"),
    "bench": ("splitmq.bench.cli", "benchmark splitmq against local training, the broker and torch.rpc"),
}
#: Set by the first SIGTERM/SIGINT; a party finishes its current message and exits (130).
STOP = runtime.StopFlag()


def _globals() -> argparse.ArgumentParser:
    g = argparse.ArgumentParser(add_help=False)
    g.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING (default INFO)")
    return g


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the chosen sub-command's options (the others' modules are not imported)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="splitmq", description="Asynchronous split learning over RabbitMQ",
                                     parents=[_globals()])
    parser.add_argument("--version", action="version", version=f"splitmq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    chosen = _chosen(argv)
    for name, (module, help_text) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module).register(_WithGlobals(sub))
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _chosen(argv: list[str]) -> str | None:
    """The sub-command named on the command line (skipping global options and their values)."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--log-level":
            skip = True
        elif not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


class _WithGlobals:
    """Sub-parsers that also take the global options, so ``splitmq worker --log-level DEBUG`` works."""

    def __init__(self, sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
        self._sub = sub

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        parents = list(kwargs.pop("parents", [])) + [_globals()]  # type: ignore[call-overload]
        return self._sub.add_parser(name, parents=parents, **kwargs)  # type: ignore[arg-type]


def finish(party: "Party", args: argparse.Namespace) -> int:
    """Serve metrics, run the party, write its summary; the exit code says how it ended."""
    if getattr(args, "metrics_port", None) is not None:
        from splitmq.shared.metrics import serve
        port = serve(args.metrics_port)
        log.info("%s: metrics on http://0.0.0.0:%d/metrics", party.opts.name, port)
    outcome = party.run()
    runtime.write_json(getattr(args, "summary_json", None), outcome.summary)
    linger = getattr(args, "metrics_linger", 0.0)
    if outcome.reason.value == "done" and getattr(args, "metrics_port", None) is not None and linger > 0:
        party.stats.finished()
        log.info("%s: done; keeping /metrics up for %.0fs so Prometheus sees the finish", party.opts.name, linger)
        time.sleep(linger)  # a deliberate linger for the next scrape, not a wait for an event
    return outcome.reason.exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    level = getattr(args, "log_level", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        print(f"splitmq: --log-level {level!r}: use DEBUG, INFO, WARNING or ERROR", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # shared.broker logs what matters
    STOP.install()
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError) as exc:
        print(f"splitmq {args.command}: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
