"""``splitmq broker ...``: topology definitions, job set-up, and per-party broker users.

    splitmq broker definitions [--write]          broker_config/definitions.json from shared.topology
    splitmq broker setup --job-id J [--stage S ...] [--client NAME ...]
    splitmq broker add-client NAME [--job-id J] [--json]      a data owner's user, queue, rights
    splitmq broker add-trainer NAME [--job-id J] [--may-declare] [--json]
    splitmq broker remove-client NAME [--delete-queue]         revoke (trainers too)

The admin side talks to the management API (``--admin-url``, credentials in the URL,
default guest on localhost) and declares queues over AMQP as the admin (``--amqp-url``).
The new user's password is printed once, for the operator to hand to the edge device; it
is never logged and, if ``--definitions-dir`` is given, only its hash is written there.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from splitmq import shipped
from splitmq.shared import access, amqp, config, topology
from splitmq.shared.errors import SplitMQError

log = logging.getLogger(__name__)

RABBIT_VERSION = "3.10.8"
DEFINITIONS_PATH = shipped("broker_config", "definitions.json")
DEFAULT_ADMIN_URL = "http://localhost:15672"


def definitions_text() -> str:
    """The exact contents of broker_config/definitions.json: the default job's topology."""
    defs: dict[str, Any] = {"rabbit_version": RABBIT_VERSION, "vhosts": [{"name": "/"}]}
    defs.update(topology.definitions(topology.job_layout(topology.DEFAULT_JOB)))
    return json.dumps(defs, indent=2) + "\n"


def with_credentials(url: str, username: str, password: str) -> str:
    """``url`` (each address of a cluster's list) with its user and password replaced (URL-safe names here)."""
    return ",".join(_with_credentials(u, username, password) for u in amqp.addresses(url))


def _with_credentials(url: str, username: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    netloc = f"{urllib.parse.quote(username, safe='')}:{urllib.parse.quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/%2F", parts.query, ""))


def _vhost(amqp_url: str) -> str:
    path = urllib.parse.urlsplit(amqp.addresses(amqp_url)[0]).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


# ---- commands ----------------------------------------------------------------------------

def cmd_definitions(args: argparse.Namespace) -> int:
    text = definitions_text()
    if args.write:
        DEFINITIONS_PATH.write_text(text)
        print(f"wrote {DEFINITIONS_PATH}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    layout = topology.job_layout(args.job_id, tuple(args.stage or [topology.TOP_STAGE]), tuple(args.client or []))
    amqp.declare(args.amqp_url, _as_job_has_it(args, layout), _admin_tls(args))
    print(f"declared job {args.job_id}: {len(layout.exchanges)} exchanges, {len(layout.queues)} queues")
    return 0


def _as_job_has_it(args: argparse.Namespace, layout: topology.Layout) -> topology.Layout:
    """``layout`` with the job's replicas and delivery, as its parties declare it (else they could not)."""
    return topology.with_delivery(topology.with_replicas(layout, args.replicas), args.delivery)


def _admin_tls(args: argparse.Namespace) -> dict[str, str]:
    pairs = (("ca", args.admin_tls_ca), ("cert", args.admin_tls_cert), ("key", args.admin_tls_key))
    return {k: v for k, v in pairs if v}


def _add_user(args: argparse.Namespace, role: str) -> int:
    name = topology.check_name("client", args.name)
    stages = tuple(args.stage or [topology.TOP_STAGE])
    api = access.ManagementAPI(args.admin_url, vhost=_vhost(args.amqp_url))
    if api.user_exists(name):
        print(f"broker user {name!r} already exists; remove it first (splitmq broker remove-client {name})",
              file=sys.stderr)
        return 1
    if role == "client":
        perms = access.client_permissions(args.job_id, name, stages)
        layout = topology.job_layout(args.job_id, stages, (name,))  # the job's exchanges, if new
    else:
        perms = access.trainer_permissions(args.job_id, stages, may_declare=args.may_declare)
        layout = topology.job_layout(args.job_id, stages)
    # The admin declares what the user may not: a client has no configure right at all.
    amqp.declare(args.amqp_url, _as_job_has_it(args, layout), _admin_tls(args))
    password = access.new_password()
    pw_hash = access.password_hash(password)
    api.put_user(name, pw_hash)
    api.set_permissions(name, perms)
    if args.definitions_dir:
        _persist(Path(args.definitions_dir), name,
                 access.user_definitions(name, pw_hash, perms, api.vhost,
                                         _as_job_has_it(args, topology.client_layout(args.job_id, name))
                                         if role == "client" else None))
    log.info("added broker user %s (%s) for job %s", name, role, args.job_id)
    _print_credentials(args, role, name, password, stages)
    return 0


def _persist(directory: Path, name: str, defs: dict[str, Any]) -> None:
    """Write the user's boot definitions (hash only), readable by root alone."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"user-{name}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(defs, f, indent=2)


def _print_credentials(args: argparse.Namespace, role: str, name: str, password: str,
                       stages: tuple[str, ...]) -> None:
    url = with_credentials(args.public_url or args.amqp_url, name, password)
    info: dict[str, Any] = {"role": role, "amqp_url": url, "username": name, "password": password,
                            "job_id": args.job_id, "vhost": _vhost(args.amqp_url)}
    if role == "client":
        info.update(client_id=name, reply_queue=topology.reply_queue(args.job_id, name),
                    routing_keys=[topology.forward_routing_key(name, s) for s in stages])
    else:
        info.update(forward_queues=[topology.forward_queue(args.job_id, s) for s in stages])
    if args.json:
        print(json.dumps(info))
        return
    command = "worker --client-id " + name if role == "client" else "server"
    print(f"broker user {name!r} ({role}) for job {args.job_id!r}. Give the device, over a safe channel:\n"
          f"  AMQP_URL={url}\n"
          f"  splitmq {command} --job-id {args.job_id} --amqp-url \"$AMQP_URL\"\n"
          f"The password is shown only now; `splitmq broker remove-client {name}` revokes it.")


def cmd_remove(args: argparse.Namespace) -> int:
    name = topology.check_name("client", args.name)
    api = access.ManagementAPI(args.admin_url, vhost=_vhost(args.amqp_url))
    existed = api.delete_user(name)  # the broker also closes its open connections
    if args.definitions_dir:
        (Path(args.definitions_dir) / f"user-{name}.json").unlink(missing_ok=True)
    if args.delete_queue:
        api.delete_queue(topology.reply_queue(args.job_id, name))
    print(f"broker user {name!r} {'removed, its connections closed' if existed else 'did not exist'}"
          + (f"; deleted {topology.reply_queue(args.job_id, name)}" if args.delete_queue else ""))
    return 0


# ---- argument parsing ------------------------------------------------------------------

def _admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job-id", default=topology.DEFAULT_JOB)
    p.add_argument("--amqp-url", default=os.environ.get("SPLITMQ_ADMIN_AMQP_URL", config.DEFAULT_AMQP_URL),
                   help="AMQP URL of an admin user, for declaring queues (default guest on localhost); a "
                        "cluster's nodes comma-separated")
    p.add_argument("--admin-url", default=os.environ.get("SPLITMQ_ADMIN_URL", DEFAULT_ADMIN_URL),
                   help="management API, http://[user:pass@]host:port (default guest on localhost:15672); a "
                        "cluster's nodes comma-separated")
    p.add_argument("--replicas", type=int, default=topology.QUORUM_REPLICAS,
                   help="replicas of each queue declared, on a cluster (x-quorum-initial-group-size)")
    p.add_argument("--delivery", choices=("durable", "transient"), default="durable",
                   help="the job's delivery: transient declares its forward and reply queues classic")
    p.add_argument("--admin-tls-ca", help="CA bundle to verify the broker when --amqp-url is amqps://")
    p.add_argument("--admin-tls-cert", help="the admin's client certificate, if the broker requires one")
    p.add_argument("--admin-tls-key")
    p.add_argument("--definitions-dir", default=os.environ.get("SPLITMQ_DEFINITIONS_DIR"),
                   help="also keep the user (password hash only) in DIR/user-NAME.json, which "
                        "deploy/broker.sh loads at boot (e.g. $STATE_ROOT/definitions.d)")


def _user_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="user name = client id (letters, digits, _ -)")
    _admin_args(p)
    p.add_argument("--stage", action="append", help="stage(s) it sends to or serves (default top)")
    p.add_argument("--public-url", help="broker URL the device connects to (default: --amqp-url's host), "
                                        "e.g. amqps://broker.example:5671/%%2F")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _reporting(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Admin errors (refused, unreachable) are one line for the operator, not a traceback."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (SplitMQError, ValueError) as exc:
            print(f"splitmq broker {args.broker_command}: {exc}", file=sys.stderr)
            return 1
    return run


def register(subparsers: Any) -> None:
    top = subparsers.add_parser("broker", help="broker topology and users")
    sub = top.add_subparsers(dest="broker_command", required=True)
    p = sub.add_parser("definitions", help="print (or --write) broker_config/definitions.json")
    p.add_argument("--write", action="store_true")
    p.set_defaults(func=cmd_definitions)
    p = sub.add_parser("setup", help="declare a job's exchanges and queues")
    _admin_args(p)
    p.add_argument("--stage", action="append")
    p.add_argument("--client", action="append", help="also declare this client's reply queue")
    p.set_defaults(func=_reporting(cmd_setup))
    p = sub.add_parser("add-client", help="create a data owner's user, reply queue and least-privilege rights")
    _user_args(p)
    p.set_defaults(func=_reporting(lambda a: _add_user(a, "client")))
    p = sub.add_parser("add-trainer", help="create a trainer's user with only the rights it needs")
    _user_args(p)
    p.add_argument("--may-declare", action="store_true", help="let it declare the job's exchanges and its queues")
    p.set_defaults(func=_reporting(lambda a: _add_user(a, "trainer")))
    p = sub.add_parser("remove-client", help="revoke a user (client or trainer); its connections are closed")
    p.add_argument("name")
    _admin_args(p)
    p.add_argument("--delete-queue", action="store_true", help="also delete the client's reply queue")
    p.set_defaults(func=_reporting(cmd_remove))
