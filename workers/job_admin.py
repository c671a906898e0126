"""``splitmq job delete JOB``: remove a job's queues and exchanges from the broker.

A job's queues are durable: they outlive every party, which is what lets an owner come back
after days. When a job is over (or is to be run again from scratch) they go with this
command; leftovers of an earlier run under the same job id would otherwise be delivered to the
new one. Everything named ``splitmq.<job>.*`` is found through the management API.
"""
from __future__ import annotations

import argparse
import os
import sys

from splitmq.shared import topology
from splitmq.shared.access import ManagementAPI
from splitmq.shared.errors import SplitMQError

DEFAULT_ADMIN_URL = "http://guest:guest@localhost:15672"


def delete_job(job: str, admin_url: str = DEFAULT_ADMIN_URL, vhost: str = "/") -> tuple[list[str], list[str]]:
    """Delete every queue and exchange of ``job``; returns what was deleted (queues, exchanges).

    Raises:
        BrokerError / AccessRefused: the management API is unreachable or refuses the user.
    """
    topology.check_name("job", job)
    api = ManagementAPI(admin_url, vhost=vhost)
    prefix = f"splitmq.{job}."
    queues = api.names("queues", prefix)
    for name in queues:
        api.delete_queue(name)
    exchanges = api.names("exchanges", prefix)
    for name in exchanges:
        api.delete_exchange(name)
    return queues, exchanges


def cmd_delete(args: argparse.Namespace) -> int:
    try:
        queues, exchanges = delete_job(args.job, args.admin_url)
    except (SplitMQError, ValueError) as exc:
        print(f"splitmq job delete: {exc}", file=sys.stderr)
        return 69
    print(f"job {args.job}: deleted {len(queues)} queues and {len(exchanges)} exchanges")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    top = sub.add_parser("job", help="manage a job's broker objects")
    cmds = top.add_subparsers(dest="job_command", required=True)
    p = cmds.add_parser("delete", help="delete a job's queues and exchanges (its pending messages too)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("job", help="the job id")
    p.add_argument("--admin-url", default=os.environ.get("SPLITMQ_ADMIN_URL", DEFAULT_ADMIN_URL),
                   help="management API, http://user:pass@host:port")
    p.set_defaults(func=cmd_delete)
