"""Prometheus metrics, declared once, under the ``splitmq_`` prefix and in base units.

Labels come from small fixed sets (role, outcome, reason, direction); ids of clients or
batches are never labels. Every series but ``splitmq_finished`` (which describes the endpoint)
also carries ``job_id`` (one value per process).
Each process builds one ``Metrics`` on a registry (the default one in production, a fresh
``CollectorRegistry`` in tests) and serves it with ``serve()``.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import REGISTRY

ROLES = ("worker", "trainer", "stage")
OUTCOMES = ("applied", "duplicate", "evaluated", "skipped")
#: Fixed set of rejection reasons (see shared.validate); anything else is "other".
REJECT_REASONS = (
    "decode", "schema", "kind", "job", "dtype", "shape", "batch_size", "size", "non_finite",
    "sequence", "identity", "not_joined", "membership", "handler_error", "delivery_limit", "other",
)
#: Task metric names (shared.scores.METRIC_NAMES; a fixed set, they are label values).
TASK_METRICS = ("loss", "accuracy", "roc_auc", "mae", "rmse")
#: Round trips on this machine kind run 3-50 ms with one in flight, up to seconds under load.
ROUND_TRIP_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.012, 0.016, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
STEP_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.25, 1.0)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
#: What became of inference requests (``shared.wire.Served``; a test checks they agree).
INFERENCE_OUTCOMES = ("ok", "invalid", "expired", "timeout", "unavailable", "failed")
#: Prediction latency through the broker: milliseconds on a LAN, up to the request's deadline.
INFERENCE_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.012, 0.016, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """All splitmq metrics for one process, pre-created for every label value."""

    def __init__(self, role: str, registry: CollectorRegistry = REGISTRY, *, job_id: str = "") -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.job_id = job_id
        self.registry = registry
        p = "splitmq_"
        self.batches = Counter(p + "batches_total", "Training batches handled, by outcome",
                               ["job_id", "role", "outcome"], registry=registry)
        self.samples = Counter(p + "samples_total", "Training samples whose gradient was applied",
                               ["job_id", "role"], registry=registry)
        self.loss = Gauge(p + "loss", "Loss of the most recent training batch", ["job_id", "role"], registry=registry)
        self.test_accuracy = Gauge(p + "test_accuracy_ratio", "Accuracy on the test split (0-1)",
                                   ["job_id", "role"], registry=registry)
        self.round_trip = Histogram(p + "round_trip_seconds",
                                    "From publishing activations to applying their gradient",
                                    ["job_id", "role"], buckets=ROUND_TRIP_BUCKETS, registry=registry)
        self.step_time = Histogram(p + "step_seconds", "Compute time of one segment step (forward+backward+update)",
                                   ["job_id", "role"], buckets=STEP_BUCKETS, registry=registry)
        self.bytes = Counter(p + "bytes_total", "Message body bytes, by direction",
                             ["job_id", "role", "direction"], registry=registry)
        self.in_flight = Gauge(p + "in_flight_batches", "Batches sent whose gradient has not been applied",
                               ["job_id", "role"], registry=registry)
        self.staleness = Histogram(p + "gradient_staleness_updates",
                                   "Optimizer updates between a batch's forward pass and its gradient's application",
                                   ["job_id", "role"], buckets=STALENESS_BUCKETS, registry=registry)
        self.rejected = Counter(p + "rejected_messages_total", "Messages dead-lettered, by reason",
                                ["job_id", "role", "reason"], registry=registry)
        self.reconnects = Counter(p + "reconnects_total", "Broker reconnections after a lost connection",
                                  ["job_id", "role"], registry=registry)
        self.clients = Gauge(p + "clients_active", "Clients heard from within the activity window",
                             ["job_id", "role"], registry=registry)
        self.last_progress = Gauge(p + "last_progress_timestamp_seconds",
                                   "Unix time of the last applied training batch", ["job_id", "role"], registry=registry)
        self.epoch = Gauge(p + "epoch", "Current epoch (0-based)", ["job_id", "role"], registry=registry)
        self.skipped = Counter(p + "skipped_batches_total", "Batches skipped by a policy (e.g. a late vertical party)",
                               ["job_id", "role", "reason"], registry=registry)
        self.test_metric = Gauge(p + "test_metric", "Task metrics of the latest evaluation pass (accuracy, roc_auc, "
                                 "mae, rmse, loss)", ["job_id", "role", "metric"], registry=registry)
        self.inference_requests = Counter(p + "inference_requests_total", "Inference requests by outcome: a "
                                          "requester counts the requests it made, a stage those it served",
                                          ["job_id", "role", "outcome"], registry=registry)
        self.inference_latency = Histogram(p + "inference_latency_seconds", "Inference request latency: at the "
                                           "requester from sending to the answer, at a stage the time to serve it",
                                           ["job_id", "role"], buckets=INFERENCE_BUCKETS, registry=registry)
        self.cut_dcor = Gauge(p + "cut_distance_correlation", "NoPeek: distance correlation between the raw "
                              "inputs and the cut activations of the latest training batch (0-1)",
                              ["job_id", "role"], registry=registry)
        self.cut_bytes_per_sample = Gauge(p + "cut_bytes_per_sample", "Body bytes sent per training sample in "
                                          "activations or gradient messages (compression at the cut lowers it)",
                                          ["job_id", "role"], registry=registry)
        for attribute, family in list(vars(self).items()):
            if isinstance(family, MetricWrapperBase):
                setattr(self, attribute, _JobFamily(family, job_id))
        # The endpoint's state, not the job's, so no job_id: every process serving on a port writes
        # the same series, and the alerts read the last process's value (an earlier job that
        # finished on the port must not hide a later party that dies there).
        self.finished = Gauge(p + "finished", "1 once this party has ended its part of the job cleanly (its "
                              "endpoint going away then pages nobody)", ["role"], registry=registry)
        for outcome in OUTCOMES:
            self.batches.labels(role, outcome)
        for outcome in INFERENCE_OUTCOMES:
            self.inference_requests.labels(role, outcome)
        self.inference_latency.labels(role)
        for reason in REJECT_REASONS:
            self.rejected.labels(role, reason)
        for direction in ("sent", "received"):
            self.bytes.labels(role, direction)
        for m in (self.samples, self.loss, self.test_accuracy, self.round_trip, self.step_time,
                  self.in_flight, self.staleness, self.reconnects, self.clients, self.last_progress, self.epoch,
                  self.cut_dcor, self.cut_bytes_per_sample, self.finished):
            m.labels(role)

    def task_metric(self, name: str, value: float) -> None:
        """One task metric of an evaluation pass; names outside the fixed set are not exported."""
        if name in TASK_METRICS:
            self.test_metric.labels(self.role, name).set(value)
        if name == "accuracy":
            self.test_accuracy.labels(self.role).set(value)

    def reject(self, reason: str) -> None:
        """Count one dead-lettered message; unknown reasons fold into ``other``."""
        self.rejected.labels(self.role, reason if reason in REJECT_REASONS else "other").inc()


class _JobFamily:
    """A metric family whose first label, ``job_id``, is this process's job: two jobs on one
    Prometheus stay apart, and the code that counts names only the other labels. Each labelled
    child is looked up once and kept: prometheus_client's ``labels()`` validates and locks on
    every call, a cost the per-batch path paid a dozen times per batch."""

    def __init__(self, family: MetricWrapperBase, job_id: str) -> None:
        self._family, self._job_id = family, job_id
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._family.labels(self._job_id, *values)
        return child


def serve(port: int, registry: CollectorRegistry = REGISTRY, addr: str = "0.0.0.0") -> int:
    """Serve ``/metrics`` on ``port`` (0 picks a free one); returns the port bound."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return int(server.server_address[1])
