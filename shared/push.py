"""Push a registry to a Prometheus Pushgateway, for edge workers Prometheus cannot scrape.

A worker behind NAT (a phone, a Raspberry Pi on a home network) has no address Prometheus can
reach, so it pushes its metrics every few seconds instead. The gateway keeps the last push
per (job, instance) group; Prometheus scrapes the gateway with ``honor_labels: true`` so the
client id stays in the ``instance`` label (deploy/prometheus/prometheus.yml).

A gateway that is down or slow must never stop training: failed pushes are logged and retried
at the next interval.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from prometheus_client import CollectorRegistry, push_to_gateway

log = logging.getLogger(__name__)

#: A push that takes longer than this is abandoned; the next interval tries again.
PUSH_TIMEOUT_S = 5.0


def start_pushing(url: str, *, job: str, instance: str, registry: CollectorRegistry,
                  interval_s: float = 10.0) -> Callable[[], None]:
    """Push ``registry`` to the Pushgateway at ``url`` now and then every ``interval_s``.

    Args:
        url: the gateway, e.g. ``http://gateway:9091`` (``host:port`` also works).
        job: the ``job`` label of the group (e.g. ``splitmq-worker``).
        instance: the ``instance`` label of the group: the client id, so each worker has its own.
        registry: what to push (the worker's ``Metrics`` registry).
        interval_s: seconds between pushes.

    Returns:
        A function that stops the pushing thread and does a final push, so the gateway holds the
        worker's final counters. Calling it more than once is harmless.

    Raises:
        ValueError: on an empty url, job or instance, or a non-positive interval.
    """
    for name, value in (("url", url), ("job", job), ("instance", instance)):
        if not value:
            raise ValueError(f"{name} must not be empty")
    if not interval_s > 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
    stopping = threading.Event()
    stop_lock = threading.Lock()
    stopped = [False]

    def push() -> None:
        try:
            push_to_gateway(url, job=job, registry=registry, grouping_key={"instance": instance},
                            timeout=PUSH_TIMEOUT_S)
        except Exception as exc:  # any failure (refused, timeout, HTTP error) means: try again later
            log.warning("push to %s (job=%s instance=%s) failed: %r", url, job, instance, exc)

    def loop() -> None:
        push()
        while not stopping.wait(interval_s):
            push()

    thread = threading.Thread(target=loop, name=f"pushgateway-{instance}", daemon=True)
    thread.start()
    log.info("pushing metrics to %s every %ss as job=%s instance=%s", url, interval_s, job, instance)

    def stop() -> None:
        with stop_lock:
            if stopped[0]:
                return
            stopped[0] = True
        stopping.set()
        thread.join(PUSH_TIMEOUT_S * 2)
        push()

    return stop
