"""The ``splitmq`` command. Each sub-command lives in its own module with a ``register``.

Exit codes (docs/cli.md): 0 done, 1 failed, 2 usage, 3 configuration, 69 broker
unavailable, 75 a peer was silent (retry later), 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import TYPE_CHECKING

from splitmq.shared.errors import ConfigError
from splitmq.workers import runtime

if TYPE_CHECKING:
    from splitmq.workers.party import Party

log = logging.getLogger("splitmq")

#: Modules that add sub-commands; each has ``register(subparsers)`` setting ``func``.
COMMAND_MODULES = (
    "splitmq.workers.worker",
    "splitmq.workers.server",
    "splitmq.workers.demo",
    "splitmq.workers.broker_admin",
    "splitmq.workers.job_admin",
    "splitmq.workers.status",
    "splitmq.workers.plot",
    "splitmq.workers.predict_cli",
    "splitmq.workers.export",
    "splitmq.workers.consent",
    "splitmq.bench.cli",
)
#: Set by the first SIGTERM/SIGINT; a party finishes its current message and exits (130).
STOP = runtime.StopFlag()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitmq", description="Asynchronous split learning over RabbitMQ")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def finish(party: "Party", args: argparse.Namespace) -> int:
    """Serve metrics, run the party, write its summary; the exit code says how it ended."""
    if getattr(args, "metrics_port", None) is not None:
        from splitmq.shared.metrics import serve
        port = serve(args.metrics_port)
        log.info("%s: metrics on http://0.0.0.0:%d/metrics", party.opts.name, port)
    outcome = party.run()
    runtime.write_json(getattr(args, "summary_json", None), outcome.summary)
    return outcome.reason.exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # shared.broker logs what matters
    STOP.install()
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError) as exc:
        print(f"splitmq {args.command}: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
