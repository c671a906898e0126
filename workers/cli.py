"""The ``splitmq`` command. Each sub-command lives in its own module with a ``register``."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: Modules that add sub-commands; each has ``register(subparsers)`` setting ``func``.
COMMAND_MODULES = (
    "splitmq.workers.worker",
    "splitmq.workers.server",
    "splitmq.workers.demo",
    "splitmq.workers.broker_admin",
    "splitmq.workers.status",
    "splitmq.workers.plot",
    "splitmq.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitmq", description="Asynchronous split learning over RabbitMQ")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command module not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # shared.broker logs what matters
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
