"""shared/push.py against a stand-in Pushgateway (an HTTP server recording what it is sent).
tests/deploy/test_monitoring.py pushes to the real Pushgateway and finds the values in Prometheus."""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry

from splitmq.shared.metrics import Metrics
from splitmq.shared.push import start_pushing


class Gateway:
    """Records each PUT (path, body) and lets a test wait for the n-th one."""

    def __init__(self) -> None:
        self.pushes: list[tuple[str, str]] = []
        self.changed = threading.Condition()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                with gateway.changed:
                    gateway.pushes.append((self.path, body))
                    gateway.changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, str]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.pushes) >= count, timeout), \
                f"only {len(self.pushes)} pushes arrived"
            return list(self.pushes)


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    g = Gateway()
    yield g
    g.server.shutdown()


def test_pushes_repeat_and_the_stop_function_pushes_the_final_values(gateway: Gateway) -> None:
    # Given a worker's metrics pushed every 20 ms as client-3
    registry = CollectorRegistry()
    metrics = Metrics("worker", registry)
    stop = start_pushing(gateway.url, job="splitmq-worker", instance="client-3", registry=registry, interval_s=0.02)
    # When several pushes went out, then the worker finishes a batch and stops
    gateway.wait_for(3)
    metrics.samples.labels("worker").inc(64)
    stop()
    # Then every push went to the client's group, and the last one holds the final count
    path, body = gateway.pushes[-1]
    assert {p for p, _ in gateway.pushes} == {"/metrics/job/splitmq-worker/instance/client-3"}
    assert 'splitmq_samples_total{job_id="",role="worker"} 64.0' in body
    # And nothing is pushed after stop; a second stop is harmless
    count = len(gateway.pushes)
    stop()
    assert len(gateway.pushes) == count


def test_a_gateway_that_is_down_is_logged_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    # Given a gateway URL nobody listens on
    registry = CollectorRegistry()
    Metrics("worker", registry)
    with caplog.at_level(logging.WARNING, logger="splitmq.shared.push"):
        # When pushing starts and stops
        stop = start_pushing("http://127.0.0.1:1", job="splitmq-worker", instance="client-0",
                             registry=registry, interval_s=60)
        stop()
    # Then the failures were logged, and training code saw no exception
    assert any("push to http://127.0.0.1:1" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kwargs", [
    {"url": ""}, {"job": ""}, {"instance": ""}, {"interval_s": 0}, {"interval_s": -1.0},
])
def test_bad_arguments_are_refused_before_any_thread_starts(kwargs: dict[str, object]) -> None:
    # Given otherwise valid arguments with one bad value
    args: dict[str, object] = {"url": "http://gw:9091", "job": "splitmq-worker", "instance": "client-0",
                               "registry": CollectorRegistry(), "interval_s": 5.0, **kwargs}
    url = args.pop("url")
    # Then start_pushing raises ValueError
    with pytest.raises(ValueError):
        start_pushing(url, **args)  # type: ignore[arg-type]
