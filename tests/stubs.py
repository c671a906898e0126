"""Parties on the in-memory broker, for fast tests of the loop and the roles (no RabbitMQ).

Nothing here claims the pipeline works: the tests that do run on the real broker.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch

from splitmq.shared import topology, wire
from splitmq.shared.config import JobConfig
from splitmq.shared.transport import StubBroker, StubTransport
from splitmq.workers import server, worker
from splitmq.workers.party import LoopOptions, Outcome, Party
from splitmq.workers.roles.base import Role
from splitmq.workers.stats import Stats

#: Longest any one stub event may take (generous: the suite runs on loaded machines).
DEADLINE_S = 60.0


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    """Poll an in-memory condition until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Running:
    """A Party running in a thread of the test process on a stub transport."""

    def __init__(self, roles: list[Role], transport: StubTransport, loop: LoopOptions, stats: Stats,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stop = threading.Event()
        self.stats, self.roles, self.transport = stats, roles, transport
        self.party = Party(roles, transport, loop, stats=stats, stop=self.stop.is_set, clock=clock)
        self.outcome: Outcome | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.outcome = self.party.run()

    def start(self) -> "Running":
        self.thread.start()
        return self

    def wait(self, timeout: float = DEADLINE_S) -> Outcome:
        self.thread.join(timeout)
        if self.outcome is None:
            self.stop.set()
            self.thread.join(10)
            raise AssertionError(f"{self.party.opts.name} did not end within {timeout:.0f}s")
        return self.outcome

    def finish(self) -> Outcome:
        self.stop.set()
        return self.wait()


def start_server(hub: StubBroker, cfg: JobConfig, **opts: Any) -> Running:
    stats = Stats()
    name = opts.get("stage") or cfg.stages[0]
    roles, loop = server.build(cfg, server.ServerOptions(**opts), stats)
    r = Running(roles, hub.connect(name, topology.lease_queue(cfg.job_id, name)), loop, stats).start()
    wait_for(lambda: hub.queues.get(topology.forward_queue(cfg.job_id, name)) is not None
             and hub.queues[topology.forward_queue(cfg.job_id, name)].consumers, "the server to consume")
    return r


def start_worker(hub: StubBroker, cfg: JobConfig, index: int = 0, **opts: Any) -> Running:
    stats = Stats()
    roles, loop = worker.build(cfg, worker.WorkerOptions(client_index=index, **opts), stats)
    name = topology.client_name(index)
    return Running(roles, hub.connect(name, topology.lease_queue(cfg.job_id, name)), loop, stats).start()


class Client:
    """A hand-driven data owner: publishes what a test crafts, reads what comes back."""

    def __init__(self, hub: StubBroker, cfg: JobConfig, name: str = "client-0") -> None:
        self.hub, self.cfg, self.name = hub, cfg, name
        self.conn = hub.connect(name)
        self.conn.start()
        hub.declare(topology.job_layout(cfg.job_id, stages=cfg.stages[:1], parties=(name,)))
        self.queue = topology.reply_queue(cfg.job_id, name)

    def send(self, msg: wire.Message, cid: str, *, sender: str | None = None, reply_to: str | None = None) -> None:
        self.conn.publish(topology.activations_exchange(self.cfg.job_id),
                          topology.forward_routing_key(sender or self.name, self.cfg.stages[0]), msg.encode(),
                          message_id=cid, correlation_id=cid, reply_to=reply_to or self.name).result(5)

    def replies(self) -> list[wire.AnyMessage]:
        """Every answer waiting in our reply queue (taken off it)."""
        with self.hub.lock:
            q = self.hub.queues[self.queue]
            bodies = [m.body for m in q.ready]
            q.ready.clear()
        return [wire.decode(b) for b in bodies]

    def hello(self, spec: dict[str, Any], **facts: Any) -> wire.Hello:
        self.send(wire.Hello(job_id=self.cfg.job_id, client_id=self.name, seq=0, spec=spec,
                             facts={"client_index": 0, "num_samples": 64, "batches_per_epoch": 1, **facts}),
                  topology.request_id(self.name, "hello", 1))
        answer = wait_for(self.replies, "the hello's answer")
        assert isinstance(answer[0], wire.Hello)
        return answer[0]


def joined(cfg: JobConfig) -> tuple[StubBroker, Running, Client]:
    """A stub trainer serving ``cfg`` and a hand-driven owner that has joined it."""
    hub = StubBroker()
    srv = start_server(hub, cfg, serve_forever=True)
    client = Client(hub, cfg)
    assert client.hello(owner_spec(cfg)).error == ""
    return hub, srv, client


def owner_spec(cfg: JobConfig) -> dict[str, Any]:
    """A built-in MLP owner's join spec (what a real worker would send)."""
    from splitmq.workers import assemble
    samples = assemble.owner_data(cfg, 0)
    return assemble.owner_spec(cfg, assemble.bottom_stage(cfg, 0, len(samples.train), "cpu"), samples)


def forward(cfg: JobConfig, seq: int, *, client: str = "client-0", batch: int = 4, value: float = 0.1) -> wire.Forward:
    return wire.Forward(job_id=cfg.job_id, client_id=client, seq=seq, activations=torch.full((batch, 640), value),
                        labels=torch.zeros(batch, dtype=torch.int64), sample_ids=torch.arange(batch))
