"""Broker users and their least-privilege permissions, and the management API that sets them.

Each party logs in as its own RabbitMQ user, named like its client id, so the broker can
vouch for who sent a message (the ``user_id`` property, checked against the login) and can
refuse what a party has no business doing:

* a **client** configures nothing, writes only its job's activations exchange and, through a
  topic permission, only under routing keys ``<client>.<stage>``; it reads only its own
  reply queue. It cannot read another client's gradients or pose as another client.
* a **trainer** reads its stage's forward queues and writes the gradients and dead-letter
  exchanges. With ``may_declare`` it may also declare the job's exchanges and its own
  queues, but never bind anything to a client's reply queue.

Permission patterns are regular expressions over names from ``shared.topology``. The
management API is spoken with urllib; clear passwords go only to the caller, the broker
receives RabbitMQ's salted SHA-256 hash.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from splitmq.shared import topology
from splitmq.shared.errors import AccessRefused, BrokerError

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
#: Matches nothing: RabbitMQ's way to grant no right of a kind.
NOTHING = "^$"
HTTP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class TopicPermission:
    """Routing keys a user may publish (``write``) to one topic exchange."""

    exchange: str
    write: str
    read: str = NOTHING


@dataclass(frozen=True)
class Permissions:
    """One user's rights on a vhost: regular expressions over resource names."""

    configure: str
    write: str
    read: str
    topics: tuple[TopicPermission, ...] = ()

    def allows(self, kind: str, resource: str) -> bool:
        """Whether ``kind`` (configure, write, read) matches ``resource``, as RabbitMQ decides it."""
        return re.search(getattr(self, kind), resource) is not None


def _exactly(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def client_permissions(job: str, client: str, stages: tuple[str, ...] = (topology.TOP_STAGE,)) -> Permissions:
    """A data owner: publish its own activations, read its own gradients, nothing else."""
    return Permissions(
        configure=_exactly(topology.lease_queue(job, client)),
        write=_exactly(topology.activations_exchange(job)),
        read=_exactly(topology.reply_queue(job, client)),
        topics=(TopicPermission(topology.activations_exchange(job),
                                _exactly(*(topology.forward_routing_key(client, s) for s in stages))),),
    )


def trainer_permissions(job: str, stages: tuple[str, ...] = (topology.TOP_STAGE,), *,
                        may_declare: bool = False) -> Permissions:
    """A stage's server: consume its forward (and, as a middle hop, reply) queues, answer on the
    gradients exchange, pass batches on under its own stage name, and hold its lease.

    ``may_declare`` adds what ``amqp.declare(job_layout(job, stages))`` needs: configure
    the job's exchanges and the stage's own queues, and bind them (write on the queue, read
    on the exchange). Client reply queues stay out of reach: binding one to the activations
    exchange would hand one client's activations to another.
    """
    forward = [topology.forward_queue(job, s) for s in stages]
    replies = [topology.reply_queue(job, s) for s in stages]
    leases = [topology.lease_queue(job, s) for s in stages]
    exchanges = [topology.activations_exchange(job), topology.gradients_exchange(job),
                 topology.dead_letter_exchange(job)]
    dlq = topology.dead_letter_queue(job)
    own_keys = TopicPermission(topology.activations_exchange(job),
                               "^(" + "|".join(re.escape(s) for s in stages) + r")\.[A-Za-z0-9_-]+$")
    writes = [topology.gradients_exchange(job), topology.dead_letter_exchange(job), topology.activations_exchange(job)]
    if not may_declare:
        return Permissions(configure=_exactly(*leases), write=_exactly(*writes),
                           read=_exactly(*forward, *replies), topics=(own_keys,))
    return Permissions(
        configure=_exactly(*exchanges, *forward, *replies, dlq, *leases),
        write=_exactly(*writes, *forward, *replies, dlq),
        read=_exactly(*forward, *replies, topology.activations_exchange(job), topology.gradients_exchange(job),
                      topology.dead_letter_exchange(job)),
        topics=(own_keys,),
    )


def new_password() -> str:
    """A random password, URL-safe so it can sit in an amqp:// URL unquoted."""
    return secrets.token_urlsafe(24)


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)).

    Same scheme as deploy/node_definitions.py (which must stay stdlib-only and standalone).
    """
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def user_definitions(name: str, pw_hash: str, perms: Permissions, vhost: str = "/",
                     layout: topology.Layout | None = None) -> dict[str, Any]:
    """A definitions-file fragment re-creating a user at node boot (hash only, never the password)."""
    defs: dict[str, Any] = {
        "users": [{"name": name, "password_hash": pw_hash, "hashing_algorithm": HASHING_ALGORITHM, "tags": []}],
        "permissions": [{"user": name, "vhost": vhost, "configure": perms.configure,
                         "write": perms.write, "read": perms.read}],
        "topic_permissions": [{"user": name, "vhost": vhost, "exchange": t.exchange, "write": t.write,
                               "read": t.read} for t in perms.topics],
    }
    if layout is not None:
        defs.update({k: v for k, v in topology.definitions(layout, vhost).items() if v})
    return defs


class _Unreachable(Exception):
    """One management endpoint did not answer (another node of the cluster may)."""


class ManagementAPI:
    """The few calls of RabbitMQ's management HTTP API that user administration needs.

    ``url`` may carry the admin credentials (``http://user:pass@host:15672``); they default to
    guest:guest, which RabbitMQ accepts from loopback only. A cluster's nodes may be listed,
    comma-separated: each call goes to one that answers.
    """

    def __init__(self, url: str, *, vhost: str = "/") -> None:
        self._bases: list[str] = []
        self._user = self._password = "guest"
        for one in url.replace(",", " ").split():  # the nodes of a cluster: any of them answers for all
            parsed = urllib.parse.urlsplit(one)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"management URL must be http(s)://[user:pass@]host:port, got {one!r}")
            if parsed.username:
                self._user = urllib.parse.unquote(parsed.username)
                self._password = urllib.parse.unquote(parsed.password or "guest")
            netloc = parsed.hostname + (f":{parsed.port}" if parsed.port else "")
            self._bases.append(f"{parsed.scheme}://{netloc}/api")
        if not self._bases:
            raise ValueError("no management URL given (http(s)://[user:pass@]host:port, comma-separated for a cluster)")
        self.vhost = vhost

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        """One call, to the first node that answers (in a random order); the others only if one is down."""
        errors = []
        for base in random.sample(self._bases, len(self._bases)):
            try:
                return self._request_at(base, method, path, body)
            except _Unreachable as exc:
                errors.append(str(exc))
        raise BrokerError("management API unreachable: " + "; ".join(errors))

    def _request_at(self, base: str, method: str, path: str, body: Any) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(base + path, data=data, method=method)
        token = base64.b64encode(f"{self._user}:{self._password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise AccessRefused(f"management API refused {self._user!r}: {method} {path}: {exc.code}") from exc
            if exc.code == 404:
                raise KeyError(path) from exc
            raise BrokerError(f"management API {method} {path}: {exc.code} {exc.read()[:200]!r}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise _Unreachable(f"{base}: {exc}") from exc
        return json.loads(raw) if raw else None

    def _q(self, name: str) -> str:
        return urllib.parse.quote(name, safe="")

    def user_exists(self, name: str) -> bool:
        try:
            self._request("GET", f"/users/{self._q(name)}")
        except KeyError:
            return False
        return True

    def put_user(self, name: str, pw_hash: str) -> None:
        """Create (or overwrite) a user with no tags: it cannot use the management UI."""
        self._request("PUT", f"/users/{self._q(name)}",
                      {"password_hash": pw_hash, "hashing_algorithm": HASHING_ALGORITHM, "tags": ""})

    def set_permissions(self, name: str, perms: Permissions) -> None:
        vh, user = self._q(self.vhost), self._q(name)
        self._request("PUT", f"/permissions/{vh}/{user}",
                      {"configure": perms.configure, "write": perms.write, "read": perms.read})
        for t in perms.topics:
            self._request("PUT", f"/topic-permissions/{vh}/{user}",
                          {"exchange": t.exchange, "write": t.write, "read": t.read})

    def delete_user(self, name: str) -> bool:
        """Delete a user; False if there was none.

        Its permissions go with it, and RabbitMQ closes its open connections itself
        (CONNECTION_FORCED, "user ... is deleted"), so revocation takes effect at once.
        """
        try:
            self._request("DELETE", f"/users/{self._q(name)}")
        except KeyError:
            return False
        return True

    def names(self, kind: str, prefix: str) -> list[str]:
        """Names of the vhost's ``queues`` or ``exchanges`` that start with ``prefix``."""
        items = self._request("GET", f"/{kind}/{self._q(self.vhost)}?columns=name") or []
        return sorted(i["name"] for i in items if str(i.get("name", "")).startswith(prefix))

    def delete_exchange(self, exchange: str) -> bool:
        try:
            self._request("DELETE", f"/exchanges/{self._q(self.vhost)}/{self._q(exchange)}")
        except KeyError:
            return False
        return True

    def delete_queue(self, queue: str) -> bool:
        try:
            self._request("DELETE", f"/queues/{self._q(self.vhost)}/{self._q(queue)}")
        except KeyError:
            return False
        return True
