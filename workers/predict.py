"""``splitmq predict``: a data owner's predictions through the split model, over the broker.

The owner's process runs its trained bottom (kept in its run directory, or its checkpoint)
and sends only cut-layer activations; the stages serving the rest (``splitmq server
--serve``) answer. In a U-shaped job the owner's own head turns the last stage's output into
the prediction here, so nothing past the cut ever sees it; in a vertical job the top joins
every party's part of the same sample ids. Three modes: batch (a data set or a ``.npy`` /
``.csv`` file in, a ``.npy`` / ``.csv`` file of predictions out, with a progress line),
online (one request per line of standard input, one JSON answer per line), and ``--serve``
(answer the top's requests for this party's vertical part, and export requests, only).
``Predictor`` is the same thing from Python.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from splitmq.shared import data, defaults, topology
from splitmq.shared.broker import Broker
from splitmq.shared.config import JobConfig
from splitmq.shared.errors import ConfigError
from splitmq.shared.metrics import Metrics
from splitmq.shared.stage import Stage
from splitmq.workers import assemble, consent, gate, segments, worker
from splitmq.workers.exits import ExitReason
from splitmq.workers.party import LoopOptions, Outcome, Party
from splitmq.workers.roles.base import Role
from splitmq.workers.roles.export import ExportRole
from splitmq.workers.roles.requests import PredictClient, PredictionError
from splitmq.workers.roles.serving import PartServeRole, ServeRole
from splitmq.workers.stats import Stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictOptions:
    client_id: str = ""                  # "" = client-<index>
    client_index: int = 0
    run_dir: str | None = None           # where the trained segments and the consent file are (runs/<job>)
    checkpoint_dir: str | None = None    # or take the segments from the owner's checkpoint
    timeout_s: float = defaults.PREDICT_TIMEOUT_S
    data: data.Data | None = None        # the owner's samples (vertical parts), given in-process


def owner_stage(cfg: JobConfig, index: int, party: int, held: Mapping[int, Mapping[str, torch.Tensor]]) -> Stage:
    """Segment ``index`` of the chain with the owner's trained weights (inference only)."""
    if index not in held:
        raise ConfigError(f"the kept segments hold no segment {index} (they hold {sorted(held)})")
    stage = Stage(assemble.segment(cfg, index, party=party), optimizer=cfg.optimizer_spec)
    stage.segment.load_state_dict(dict(held[index]))
    stage.segment.eval()
    return stage


def build(cfg: JobConfig, opts: PredictOptions, stats: Stats) -> tuple[PredictClient, list[Role], LoopOptions]:
    """The owner's requester, the serving roles it hosts (its head, its vertical part, exports), its loop.

    Raises:
        ConfigError: no trained segments of this owner, or segments of another job.
    """
    me, index = worker.identity(opts.client_id, opts.client_index, cfg)
    run_dir = opts.run_dir or f"runs/{cfg.job_id}"
    held = segments.held(cfg, me, run_dir=run_dir, checkpoint_dir=opts.checkpoint_dir)
    bottom = owner_stage(cfg, 0, index, held)
    client = PredictClient(bottom, job_id=cfg.job_id, me=me, dest=cfg.stages[0], stats=stats, timeout_s=opts.timeout_s)
    roles: list[Role] = [client]
    serving, exportable = [me], {0: bottom.segment}
    if cfg.u_shaped:  # our own head makes the prediction from the last stage's output, here
        last = cfg.segment_count - 1
        head = owner_stage(cfg, last, index, held)
        roles.append(ServeRole(head, job_id=cfg.job_id, address=topology.head_stage(me), stats=stats,
                               deliver=client.deliver, accept_from=frozenset({cfg.stages[-2]})))
        serving.append(topology.head_stage(me))
        exportable[last] = head.segment
    if cfg.vertical_parts:
        samples = opts.data if opts.data is not None else assemble.owner_data(cfg, index)
        roles.append(PartServeRole(bottom, job_id=cfg.job_id, me=me, top=cfg.stages[0], samples=samples, stats=stats))
    roles.append(ExportRole(job_id=cfg.job_id, me=me, segments=exportable, consent_path=consent.path_for(run_dir, me)))
    upstream = {cfg.stages[0]} if cfg.vertical_parts else {cfg.stages[-2]} if cfg.u_shaped else set()
    loop = LoopOptions(name=me, job_id=cfg.job_id, primary="predict",
                       rules=gate.GateRules(job_id=cfg.job_id, upstream=frozenset(upstream)),
                       layout=topology.job_layout(cfg.job_id, stages=(), parties=(), serving=tuple(serving)))
    return client, roles, loop


class Predictor:
    """A data owner's predictions from Python: a party loop on its own thread, requests from any other.

        with Predictor(cfg, PredictOptions(client_index=0), amqp_url=url) as p:
            log_probs = p.predict(x)            # one request
            futures = [p.submit(b) for b in batches]
    """

    def __init__(self, cfg: JobConfig, opts: PredictOptions, *, amqp_url: str, stats: Stats | None = None,
                 tls: Mapping[str, str] | None = None, stop: Callable[[], bool] | None = None) -> None:
        from prometheus_client import CollectorRegistry
        self.stats = stats or Stats(Metrics("worker", CollectorRegistry()))
        self.client, roles, loop = build(cfg, opts, self.stats)
        transport = Broker(amqp_url, name=loop.name, tls=tls, lease=topology.serve_lease(cfg.job_id, loop.name),
                           prefetch=256)
        self.party = Party(roles, transport, loop, stats=self.stats, stop=stop if stop is not None else (lambda: False))
        self.client.on_submit = self.party.wake
        self.outcome: Outcome | None = None
        self.thread = threading.Thread(target=self._run, name=f"predict-{loop.name}", daemon=True)

    def _run(self) -> None:
        try:
            self.outcome = self.party.run()
        finally:
            detail = self.outcome.detail if self.outcome is not None else "it failed"
            self.client.fail_all("unavailable", f"the predictor's loop ended: {detail}")

    def start(self, timeout_s: float = defaults.PREDICT_START_S) -> "Predictor":
        """Start the loop and wait until it consumes its queues.

        Raises:
            PredictionError: the loop ended (or did not get ready) first; the message says why.
        """
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.client.ready.wait(0.05):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                why = self.outcome.detail if self.outcome is not None else f"not ready after {timeout_s:g}s"
                raise PredictionError("unavailable", why)
        return self

    def submit(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> Future[torch.Tensor]:
        return self.client.submit(x, sample_ids)

    def predict(self, x: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One request: the split model's outputs for ``x``.

        Raises:
            PredictionError: with the reason (timeout, unavailable, invalid, ...) and what happened.
        """
        return self.outputs(self.submit(x, sample_ids))

    def outputs(self, request: Future[torch.Tensor]) -> torch.Tensor:
        """A submitted request's outputs. The loop fails a request at its own deadline; this one
        (``PREDICT_GRACE_S`` later) ends the wait only if the loop itself is gone or stuck.

        Raises:
            PredictionError: the request's own (timeout, unavailable, invalid, ...), or ``timeout``.
        """
        limit = self.client.timeout_s + defaults.PREDICT_GRACE_S
        try:
            return request.result(timeout=limit)
        except FutureTimeout:
            loop = f"ended: {self.outcome.detail}" if self.outcome is not None else "did not settle it"
            raise PredictionError("timeout", f"no answer to the request within {limit:g}s; the predictor's "
                                             f"loop {loop}") from None

    def close(self) -> Outcome:
        self.client.close()
        self.thread.join(self.client.timeout_s + defaults.PREDICT_GRACE_S)
        return self.outcome or Outcome(ExitReason.FAILED, "the predictor did not end", {})

    def __enter__(self) -> "Predictor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def predict_all(p: Predictor, x: Any, ids: torch.Tensor, *, batch_size: int, in_flight: int,
                progress: Callable[[int, int], None] = lambda done, total: None) -> torch.Tensor:
    """Every sample's outputs, in order, with ``in_flight`` requests of ``batch_size`` outstanding.

    ``x`` is a tensor or a ``SampleSet`` (whose features are batched as in training).
    Raises ``PredictionError`` for the first request that got no prediction.
    """
    total, outs = len(ids), []
    window: collections.deque[tuple[int, Future[torch.Tensor]]] = collections.deque()
    rows_all = torch.arange(total)
    for rows in torch.split(rows_all, batch_size):
        xb = x[rows] if isinstance(x, torch.Tensor) else x.batch(rows).x
        window.append((len(rows), p.submit(xb, ids[rows])))
        while len(window) >= in_flight:
            outs.append(p.outputs(window.popleft()[1]))
            progress(sum(len(o) for o in outs), total)
    while window:
        outs.append(p.outputs(window.popleft()[1]))
        progress(sum(len(o) for o in outs), total)
    return torch.cat(outs) if outs else torch.empty(0)
