"""``splitmq status``: a terminal view of a run, for someone with a shell and no Grafana.

It reads what is already exposed: the trainer's (and optionally workers' or a Pushgateway's)
``/metrics`` in Prometheus text format, and the broker's management API for queue depths,
consumers and idle times. Clients are seen through their reply queues, since client ids are
never metric labels (shared/metrics.py); their last activity is the queue's ``idle_since``.
An endpoint that does not answer is shown as such; the view never fails because one is down.
"""
from __future__ import annotations

import argparse
import base64
import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import quote, urlparse, urlunparse

from prometheus_client.parser import text_string_to_metric_families

from splitmq.shared import topology

DEFAULT_TRAINER_METRICS = "http://localhost:9400/metrics"
DEFAULT_MANAGEMENT_URL = "http://guest:guest@localhost:15672"
#: Seconds to wait for each endpoint; a status view must come back quickly even if one is down.
FETCH_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Party:
    """One process's splitmq metrics, as read from one /metrics endpoint (or one pushed group)."""

    source: str
    role: str
    samples: float
    batches_applied: float
    loss: float | None
    test_accuracy: float | None
    epoch: float | None
    in_flight: float | None
    clients_active: float | None
    rejected: float
    evaluations: float
    mean_round_trip_s: float | None
    last_progress: float | None
    started: float | None

    def samples_per_second(self) -> float | None:
        """Average throughput from process start to the last applied batch."""
        if not self.started or not self.last_progress or self.last_progress <= self.started:
            return None
        return self.samples / (self.last_progress - self.started)


@dataclass(frozen=True)
class QueueRow:
    """One of the job's queues as the broker's management API reports it."""

    name: str
    kind: str  # forward, reply or dlq
    owner: str  # the stage, the client, or "" for the dead-letter queue
    ready: int
    unacked: int
    consumers: int
    idle_since: str | None  # classic queues only; quorum queues do not report it
    publish_rate: float | None
    delivered: int  # messages delivered to consumers since the queue was declared
    deliver_rate: float | None
    replicas: str = ""  # quorum queues on a cluster: replicas online / members ("2/3"), "" otherwise


def parse_parties(text: str, source: str) -> list[Party]:
    """Parties in a Prometheus text exposition, one per (instance, role).

    A process's own /metrics has no ``instance`` label, so ``source`` names it; a Pushgateway's
    has one per pushed group (the client id).
    """
    values: dict[tuple[str, str], dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            role = sample.labels.get("role")
            key_source = sample.labels.get("instance", source)
            if role is None and sample.name != "process_start_time_seconds":
                continue
            bucket = values.setdefault((key_source, role or ""), {})
            name = sample.name
            if name == "splitmq_batches_total":
                name += "." + sample.labels.get("outcome", "")
            if name == "splitmq_rejected_messages_total":
                bucket[name] = bucket.get(name, 0.0) + sample.value
            else:
                bucket[name] = sample.value
    started = {src: v.get("process_start_time_seconds") for (src, role), v in values.items() if role == ""}
    parties = [_party(src, role, v, started.get(src)) for (src, role), v in values.items()
               if role and "splitmq_samples_total" in v]
    return sorted(parties, key=lambda p: (p.role != "trainer", p.source))


def _party(source: str, role: str, v: Mapping[str, float], started: float | None) -> Party:
    count = v.get("splitmq_round_trip_seconds_count", 0.0)
    return Party(
        source=source, role=role, samples=v.get("splitmq_samples_total", 0.0),
        batches_applied=v.get("splitmq_batches_total.applied", 0.0),
        loss=v.get("splitmq_loss"), test_accuracy=v.get("splitmq_test_accuracy_ratio"),
        epoch=v.get("splitmq_epoch"), in_flight=v.get("splitmq_in_flight_batches"),
        clients_active=v.get("splitmq_clients_active"),
        rejected=v.get("splitmq_rejected_messages_total", 0.0),
        evaluations=v.get("splitmq_batches_total.evaluated", 0.0),
        mean_round_trip_s=v.get("splitmq_round_trip_seconds_sum", 0.0) / count if count else None,
        last_progress=v.get("splitmq_last_progress_timestamp_seconds") or None, started=started,
    )


def queue_rows(queues: Iterable[Mapping[str, Any]], job: str) -> list[QueueRow]:
    """The job's queues from a management API ``/api/queues`` answer, classified by kind.

    The name prefixes come from shared/topology.py (the one place that knows queue names).
    """
    dlq = topology.dead_letter_queue(job)
    forward_prefix = topology.forward_queue(job, "x")[:-1]
    reply_prefix = topology.reply_queue(job, "x")[:-1]
    rows = []
    for q in queues:
        name = str(q.get("name", ""))
        if name == dlq:
            kind, owner = "dlq", ""
        elif name.startswith(forward_prefix):
            kind, owner = "forward", name[len(forward_prefix):]
        elif name.startswith(reply_prefix):
            kind, owner = "reply", name[len(reply_prefix):]
        else:
            continue
        stats = q.get("message_stats", {})
        rows.append(QueueRow(name=name, kind=kind, owner=owner, ready=int(q.get("messages_ready", 0)),
                             unacked=int(q.get("messages_unacknowledged", 0)),
                             consumers=int(q.get("consumers", 0)), idle_since=q.get("idle_since"),
                             publish_rate=_rate(stats, "publish"), delivered=int(stats.get("deliver_get", 0)),
                             deliver_rate=_rate(stats, "deliver_get"), replicas=_replicas(q)))
    order = {"forward": 0, "reply": 1, "dlq": 2}
    return sorted(rows, key=lambda r: (order[r.kind], r.owner))


def _replicas(q: Mapping[str, Any]) -> str:
    """"online/members" of a replicated queue (the management API lists both for quorum queues)."""
    members, online = q.get("members"), q.get("online")
    if not isinstance(members, list) or not isinstance(online, list) or len(members) < 2:
        return ""
    return f"{len(online)}/{len(members)}"


def _rate(stats: Mapping[str, Any], name: str) -> float | None:
    rate = stats.get(f"{name}_details", {}).get("rate")
    return float(rate) if rate is not None else None


def _activity(q: QueueRow) -> str:
    """A client's last activity as its reply queue shows it."""
    if q.deliver_rate:
        return f"receiving {q.deliver_rate:.1f} gradients/s ({q.delivered} so far)"
    if q.idle_since:
        return f"idle since {q.idle_since} ({q.delivered} gradients)"
    return f"no traffic now ({q.delivered} gradients so far)"


def fetch(url: str, timeout: float = FETCH_TIMEOUT_S) -> str:
    """GET ``url``; credentials in the URL (``http://user:pass@host``) become basic auth.

    Raises:
        OSError: the endpoint did not answer, or answered with an HTTP error.
    """
    parsed = urlparse(url)
    headers = {}
    if parsed.username is not None:
        token = base64.b64encode(f"{parsed.username}:{parsed.password or ''}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        netloc = parsed.hostname or ""
        if parsed.port:
            netloc += f":{parsed.port}"
        url = urlunparse(parsed._replace(netloc=netloc))
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        return str(resp.read().decode())


def _fmt(value: float | None, spec: str = ".4f", empty: str = "-") -> str:
    """A number, or ``empty`` when there is none yet (never a misleading 0)."""
    return empty if value is None else format(value, spec)


def _short(source: str) -> str:
    """``host:port`` for a URL (the credentials dropped), the name itself for a pushed client id."""
    parsed = urlparse(source)
    return (parsed.hostname or "") + (f":{parsed.port}" if parsed.port else "") if parsed.scheme else source


def _ago(ts: float | None, now: float) -> str:
    return "never" if not ts else f"{now - ts:.0f}s ago"


def current_rates(before: list[Party], after: list[Party], seconds: float) -> dict[tuple[str, str], float]:
    """Samples per second of each party between two snapshots ``seconds`` apart (``--watch``)."""
    old = {(p.source, p.role): p.samples for p in before}
    return {(p.source, p.role): max(0.0, p.samples - old[(p.source, p.role)]) / seconds
            for p in after if (p.source, p.role) in old and seconds > 0}


def node_alarms(nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """The resource alarms of a management API ``/api/nodes`` answer, one per node and resource.
    Any of them blocks every publisher of the cluster: training stops until it clears."""
    return [f"{n.get('name', '?')}: low on {what}" for n in nodes
            for what, key in (("memory", "mem_alarm"), ("disk", "disk_free_alarm")) if n.get(key)]


def render(parties: list[Party], queues: list[QueueRow], errors: list[str], *, job: str, now: float,
           rates: Mapping[tuple[str, str], float] | None = None, alarms: list[str] | None = None) -> str:
    """The status view as text; ``rates`` (from ``current_rates``) fills the now/s column; ``alarms``
    (from ``node_alarms``; None when unknown) are the broker's."""
    rates = rates or {}
    lines = [f"splitmq job {job} at {time.strftime('%H:%M:%S', time.localtime(now))}", ""]
    lines.append(f"{'party':<24} {'role':<8} {'epoch':>5} {'samples':>9} {'avg/s':>7} {'now/s':>7} {'loss':>8} "
                 f"{'accuracy':>8} {'rtt ms':>7} {'inflight':>8} {'rejected':>8} last progress")
    for p in parties:
        rtt = None if p.mean_round_trip_s is None else p.mean_round_trip_s * 1000
        lines.append(f"{_short(p.source)[-24:]:<24} {p.role:<8} {_fmt(p.epoch, '.0f'):>5} {p.samples:>9.0f} "
                     f"{_fmt(p.samples_per_second(), '.1f'):>7} {_fmt(rates.get((p.source, p.role)), '.1f'):>7} "
                     f"{_fmt(p.loss if p.batches_applied else None, empty='no data'):>8} "
                     f"{_fmt(p.test_accuracy if p.evaluations else None, empty='no data'):>8} "
                     f"{_fmt(rtt, '.1f'):>7} {_fmt(p.in_flight, '.0f'):>8} {p.rejected:>8.0f} "
                     f"{_ago(p.last_progress, now)}")
    trainer = next((p for p in parties if p.role == "trainer"), None)
    if trainer and trainer.clients_active is not None:
        lines.append(f"trainer hears from {trainer.clients_active:.0f} client(s)")
    clients = [q for q in queues if q.kind == "reply"]
    lines += ["", f"clients seen (reply queues): {len(clients)}"]
    for q in clients:
        state = "connected" if q.consumers else "no consumer"
        lines.append(f"  {q.owner:<24} {state:<12} {_activity(q)}")
    lines += ["", f"{'queue':<44} {'ready':>7} {'unacked':>7} {'consumers':>9} {'publish/s':>9} {'replicas':>8}"]
    for q in queues:
        lines.append(f"{q.name[-44:]:<44} {q.ready:>7} {q.unacked:>7} {q.consumers:>9} "
                     f"{_fmt(q.publish_rate, '.1f'):>9} {q.replicas or '-':>8}")
    dead = sum(q.ready + q.unacked for q in queues if q.kind == "dlq")
    rejected = sum(p.rejected for p in parties)
    lines += ["", f"dead letters: {dead} in the dead-letter queue; {rejected:.0f} rejected by the parties above"]
    if alarms is not None:
        lines.append("broker alarms: " + ("; ".join(alarms) + " (every publisher is blocked until it clears)"
                                          if alarms else "none"))
    lines += [f"unreachable: {e}" for e in errors]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Snapshot:
    parties: list[Party]
    queues: list[QueueRow]
    errors: list[str]
    alarms: list[str] | None = None  # None: the management API did not say


def collect(args: argparse.Namespace) -> Snapshot:
    """Read every endpoint once; an unreachable one becomes an error line, not an exception."""
    parties: list[Party] = []
    errors: list[str] = []
    sources = [args.trainer_metrics, *args.worker_metrics]
    if args.pushgateway:
        sources.append(args.pushgateway.rstrip("/") + "/metrics")
    for url in sources:
        try:
            parties += parse_parties(fetch(url), url)
        except (OSError, ValueError) as exc:
            errors.append(f"{url} ({exc})")
    queues, failed = management_queues(args.management_url, args.vhost, args.job_id)
    nodes, failed_nodes = _first_answer(args.management_url, "/api/nodes")
    return Snapshot(parties, queues, errors + failed, node_alarms(nodes) if not failed_nodes else None)


def management_queues(urls: str, vhost: str, job: str) -> tuple[list[QueueRow], list[str]]:
    """The job's queues from the first node that answers (a cluster's nodes listed, comma-separated),
    and what did not answer if none did."""
    answer, failed = _first_answer(urls, f"/api/queues/{quote(vhost, safe='')}")
    return (queue_rows(answer, job) if not failed else []), failed


def _first_answer(urls: str, path: str) -> tuple[Any, list[str]]:
    """The JSON at ``path`` of the first management API that answers, and what did not if none did."""
    failed: list[str] = []
    for base in urls.replace(",", " ").split():
        api = base.rstrip("/") + path
        try:
            return json.loads(fetch(api)), []
        except (OSError, ValueError) as exc:
            failed.append(f"{_redact(api)} ({exc})")
    return [], failed


def _redact(url: str) -> str:
    parsed = urlparse(url)
    return url.replace(f":{parsed.password}@", ":***@") if parsed.password else url


def main(args: argparse.Namespace) -> int:
    previous: tuple[float, list[Party]] | None = None
    while True:
        snap = collect(args)
        now = time.time()
        rates = current_rates(previous[1], snap.parties, now - previous[0]) if previous else None
        previous = (now, snap.parties)
        if args.json:
            print(json.dumps({"job": args.job_id, "parties": [asdict(p) for p in snap.parties],
                              "queues": [asdict(q) for q in snap.queues], "errors": snap.errors,
                              "alarms": snap.alarms}), flush=True)
        else:
            if args.watch:
                print("\033[2J\033[H", end="")  # clear the terminal between refreshes
            print(render(snap.parties, snap.queues, snap.errors, job=args.job_id, now=now, rates=rates,
                         alarms=snap.alarms), end="", flush=True)
        if not args.watch:
            # Nothing answered: say so in the exit status too, for scripts.
            return 1 if not snap.parties and not snap.queues and snap.errors else 0
        time.sleep(args.watch)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="terminal view of a run: clients, throughput, loss, queues, dead letters")
    p.add_argument("--job-id", default=topology.DEFAULT_JOB, help=f"the job (default {topology.DEFAULT_JOB})")
    p.add_argument("--trainer-metrics", default=DEFAULT_TRAINER_METRICS,
                   help=f"the trainer's /metrics URL (default {DEFAULT_TRAINER_METRICS})")
    p.add_argument("--worker-metrics", action="append", default=[], metavar="URL",
                   help="a worker's /metrics URL (repeatable)")
    p.add_argument("--pushgateway", help="a Pushgateway URL: edge workers' pushed metrics, one row per client")
    p.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL,
                   help="RabbitMQ management API, with credentials (default guest on localhost); a cluster's "
                        "nodes comma-separated: the first that answers is read")
    p.add_argument("--vhost", default="/", help="the broker's virtual host (default /)")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until interrupted")
    p.add_argument("--json", action="store_true", help="print one JSON object per refresh instead")
    p.set_defaults(func=main)
