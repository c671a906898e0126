"""A data owner written from docs/protocol.md alone: the conformance client.

It imports nothing from splitmq (tests/conformance/test_conformance_client.py checks): pika
speaks AMQP, msgpack the envelope, numpy lays tensors out as bytes, torch runs this owner's
own bottom segment. Handed its data, the order of its batches, its bottom's initial weights
and the job's settings, it declares its queue, joins, trains with one batch in flight,
evaluates after every epoch and says bye. The § numbers are the page's sections.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pika
import pika.exceptions
import torch
from torch import nn

SCHEMA = 2
#: §5, the spec table: the job's agreed settings and their defaults.
DEFAULT_SPEC: dict[str, Any] = {
    "job_id": "mnist", "model": "mlp", "cuts": [], "stages": ["top"], "loss": "nll", "task": "classification",
    "optimizer": "SGD", "lr": 0.03, "optimizer_args": [], "lr_schedule": "cosine", "batch_size": 64, "epochs": 5,
    "seed": 0, "num_clients": 1, "bottom_sync": "average", "sync_every": 1, "label_source": "batch",
    "vertical_parts": 0, "combine": "concat", "align": "none", "privacy": "off", "bottleneck": 0, "shards": 1,
    "compress_activations": "none", "compress_gradients": "none", "topk_fraction": 0.1, "topk_feedback": False,
    "delivery": "durable", "coalesce": 4,
}
#: §4 dtype names -> numpy dtypes, little-endian on the wire.
DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1",
          "uint8": "u1"}
#: §6 and §5: when to send a batch again, when to give up, how long a "duplicate" may wait.
RESEND_AFTER_S, PEER_TIMEOUT_S, DUPLICATE_WAIT_S, JOIN_RETRY_S, JOIN_TIMEOUT_S = 120.0, 300.0, 20.0, 2.0, 600.0
#: How long one look at our reply queue waits (pika's consume generator keeps one timeout).
POLL_S = 0.5


class ProtocolError(Exception):
    """The stage refused us, or something the page says cannot happen did."""


def pack_tensor(t: torch.Tensor) -> dict[str, Any]:
    """§4: {dtype, shape, data}; data little-endian, row-major."""
    a = np.ascontiguousarray(t.detach().cpu().numpy())
    name = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items()}[a.dtype]
    return {"dtype": name, "shape": list(a.shape), "data": a.astype(DTYPES[name]).tobytes()}


def unpack_tensor(obj: dict[str, Any]) -> torch.Tensor:
    a = np.frombuffer(obj["data"], dtype=np.dtype(DTYPES[obj["dtype"]])).reshape(obj["shape"])
    return torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=True))


@dataclass(frozen=True)
class Settings:
    """Where to connect and what the job is (the agreed settings: DEFAULT_SPEC plus changes)."""

    amqp_url: str
    spec: dict[str, Any]
    name: str = "client-0"
    index: int = 0

    @property
    def job(self) -> str:
        return str(self.spec["job_id"])

    @property
    def stage(self) -> str:  # §5: the first stage (no shards here)
        return str(self.spec["stages"][0])


@dataclass(frozen=True)
class OwnerData:
    """This owner's samples (float32 features, int64 labels and ids) and its batches' rows, per epoch."""

    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_ids: torch.Tensor
    orders: list[list[torch.Tensor]]


@dataclass
class Result:
    losses: list[float] = field(default_factory=list)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    applied: int = 0


@dataclass
class Answer:
    msg: dict[str, Any]
    correlation_id: str
    tag: int


class Link:
    """One blocking pika connection: declarations (§2), confirmed mandatory publishes (§3), answers."""

    def __init__(self, s: Settings) -> None:
        params = pika.URLParameters(s.amqp_url)
        self.s, self.user = s, params.credentials.username
        self.conn = pika.BlockingConnection(params)
        self.ch = self.conn.channel()
        self.queue = f"splitmq.{s.job}.reply.{s.name}"
        self.held: list[Answer] = []   # answers read while waiting for something else

    def declare(self) -> None:
        job, ch = self.s.job, self.ch
        ch.queue_declare(f"splitmq.{job}.lease.{self.s.name}", exclusive=True, auto_delete=True)  # our lease
        for name, kind in (("activations", "topic"), ("gradients", "direct"), ("dlx", "fanout")):
            ch.exchange_declare(f"splitmq.{job}.{name}", kind, durable=True)
        args = {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3,
                "x-dead-letter-exchange": f"splitmq.{job}.dlx", "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish", "x-max-length": 100000}
        ch.queue_declare(self.queue, durable=True, arguments=args)
        ch.queue_bind(self.queue, f"splitmq.{job}.gradients", routing_key=self.s.name)
        ch.confirm_delivery()
        ch.basic_qos(prefetch_count=64)

    def send(self, kind: str, seq: int, cid: str, tensors: dict[str, torch.Tensor] | None = None,
             model_version: int = 0, **fields: Any) -> bool:
        """Publish to our stage; False if no queue took it (returned as unroutable)."""
        body = {"schema": SCHEMA, "kind": kind, "job_id": self.s.job, "client_id": self.s.name, "seq": seq,
                "model_version": model_version, "created_at": time.time(), **fields,
                "tensors": {k: pack_tensor(v) for k, v in (tensors or {}).items()}}
        props = pika.BasicProperties(delivery_mode=2, content_type="application/msgpack", message_id=cid,
                                     correlation_id=cid, reply_to=self.s.name, user_id=self.user)
        try:
            self.ch.basic_publish(f"splitmq.{self.s.job}.activations", f"{self.s.name}.{self.s.stage}",
                                  msgpack.packb(body, use_bin_type=True), props, mandatory=True)
        except pika.exceptions.UnroutableError:
            return False
        return True

    def next(self) -> Answer | None:
        """The next answer in our reply queue (unacked), or None after POLL_S without one."""
        if self.held:
            return self.held.pop(0)
        for method, props, body in self.ch.consume(self.queue, inactivity_timeout=POLL_S):
            if method is None:
                return None
            msg = msgpack.unpackb(body, raw=False)
            if msg.get("schema") != SCHEMA or msg.get("client_id") != self.s.name:
                raise ProtocolError(f"an answer the page does not allow: {msg!r:.200}")
            msg["tensors"] = {k: unpack_tensor(v) for k, v in msg["tensors"].items()}
            return Answer(msg, props.correlation_id or props.message_id or "", method.delivery_tag)
        return None

    def ack(self, a: Answer) -> None:
        self.ch.basic_ack(a.tag)

    def close(self) -> None:
        if self.conn.is_open:
            self.conn.close()


def mlp_bottom(state: dict[str, torch.Tensor]) -> nn.Module:
    """The built-in MLP's bottom (784 -> 128 -> 640, ReLUs), named as its state_dict is."""
    bottom = nn.Sequential(OrderedDict([("fc1", nn.Linear(784, 128)), ("relu1", nn.ReLU()),
                                        ("fc2", nn.Linear(128, 640)), ("relu2", nn.ReLU())]))
    bottom.load_state_dict(state)
    return bottom


class Owner:
    """One data owner's run: join (§5), train (§6), evaluate (§7), bye (§9)."""

    def __init__(self, s: Settings, bottom: nn.Module, data: OwnerData) -> None:
        self.s, self.bottom, self.data = s, bottom, data
        spec = s.spec
        self.per_epoch = math.ceil(len(data.x) / spec["batch_size"])
        self.total = spec["epochs"] * self.per_epoch
        self.optimizer = getattr(torch.optim, spec["optimizer"])(bottom.parameters(), lr=spec["lr"],
                                                                 **dict(spec["optimizer_args"]))
        self.link = Link(s)
        self.result = Result()

    def run(self) -> Result:
        try:
            self.link.declare()
            self.join()
            for epoch in range(self.s.spec["epochs"]):
                for i, rows in enumerate(self.data.orders[epoch]):
                    self.train(epoch * self.per_epoch + i, epoch, rows)
                self.evaluate(epoch)   # one owner: no bottoms to share (§8)
            self.link.send("bye", self.result.applied, f"{self.s.name}:bye:0", completed=True, reason="")
        finally:
            self.link.close()
        return self.result

    # ---- §5 ----------------------------------------------------------------------------------

    def join(self) -> None:
        with torch.no_grad():
            cut = self.bottom(self.data.x[:2])                                   # (2, *cut_shape)
        spec = {**self.s.spec, "cut_shape": list(cut.shape[1:]), "cut_dtype": "float32",
                "bottom_params": [[k, list(v.shape)] for k, v in self.bottom.state_dict().items()]}
        facts = {"client_index": self.s.index, "num_samples": len(self.data.x), "batches_per_epoch": self.per_epoch,
                 "applied_prefix": self.result.applied - 1}
        deadline, others = time.monotonic() + JOIN_TIMEOUT_S, []
        cid = f"{self.s.name}:hello:{time.time_ns()}"
        while not self.link.send("hello", 0, cid, spec=spec, facts=facts):  # no stage yet: try again
            if time.monotonic() > deadline:
                raise ProtocolError("no stage took our hello")
            time.sleep(JOIN_RETRY_S)
        while (a := self.link.next()) is None or a.correlation_id != cid:
            if a is not None:
                others.append(a)  # not the answer to this hello: look at it once joined
            if time.monotonic() > deadline:
                raise ProtocolError("no answer to our hello")
        self.link.ack(a)
        self.link.held = others + self.link.held
        if a.msg["error"]:
            raise ProtocolError(f"join refused: {a.msg['error']}")

    # ---- §6 ----------------------------------------------------------------------------------

    def train(self, seq: int, epoch: int, rows: torch.Tensor) -> None:
        out = self.bottom(self.data.x[rows])                                 # (B, 640), keeps the graph
        tensors = {"activations": out.detach(), "labels": self.data.y[rows], "sample_ids": self.data.ids[rows]}
        answer = self.exchange(seq, tensors, epoch)
        if answer is None:  # skipped: nothing to apply
            return
        grad = answer.msg["tensors"]["grad"]
        if grad.dtype != torch.float32 or grad.shape != out.shape or not bool(torch.isfinite(grad).all()):
            raise ProtocolError(f"an unusable gradient for batch {seq}")
        t = self.result.applied                                              # updates so far (§5 lr_schedule)
        factor = 0.5 * (1 + math.cos(math.pi * min(t, self.total) / self.total)) \
            if self.s.spec["lr_schedule"] == "cosine" else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.s.spec["lr"] * factor
        self.optimizer.zero_grad(set_to_none=True)
        out.backward(grad)
        self.optimizer.step()
        self.result.applied += 1
        self.result.losses.append(answer.msg["loss"])
        self.link.ack(answer)

    def exchange(self, seq: int, tensors: dict[str, torch.Tensor], epoch: int) -> Answer | None:
        """Send batch ``seq`` until it is answered; the applied answer (unacked), or None if skipped."""
        cid, attempt = f"{self.s.name}:{seq}", 0
        fields = {"train": True, "epoch": epoch, "eval_batches": 0}
        self.link.send("forward", seq, cid, tensors, self.result.applied, attempt=attempt, **fields)
        first = last = time.monotonic()
        duplicate_at: float | None = None
        while True:
            a, now = self.link.next(), time.monotonic()
            if a is None:
                if now - first > PEER_TIMEOUT_S or (duplicate_at and now - duplicate_at > DUPLICATE_WAIT_S):
                    raise ProtocolError(f"no gradient for batch {seq}")
                if now - last > RESEND_AFTER_S:
                    attempt, last = attempt + 1, now
                    self.link.send("forward", seq, cid, tensors, self.result.applied, attempt=attempt, **fields)
                continue
            outcome = a.msg.get("outcome") if a.msg["kind"] == "backward" else None
            if outcome == "applied" and a.msg["seq"] == seq:
                return a
            self.link.ack(a)
            if outcome == "refused" and a.correlation_id == cid:
                raise ProtocolError(f"batch {seq} refused: {a.msg['error']}")
            if outcome == "rejoin" and a.correlation_id == cid:
                self.join()
                attempt += 1
                self.link.send("forward", seq, cid, tensors, self.result.applied, attempt=attempt, **fields)
            elif outcome == "duplicate" and a.msg["seq"] == seq:
                duplicate_at = duplicate_at or now  # its gradient is in our queue
            elif outcome == "skipped" and a.msg["seq"] == seq:
                return None
            # anything else: an answer to something finished (a repeat of an applied batch)

    # ---- §7 ----------------------------------------------------------------------------------

    def evaluate(self, epoch: int) -> None:
        batches = list(torch.split(torch.arange(len(self.data.test_x)), self.s.spec["batch_size"]))
        pending: dict[str, int] = {}
        sent, since = 0, time.monotonic()
        while sent < len(batches) or pending:
            while sent < len(batches) and len(pending) < 4:
                pending[self.send_eval(epoch, sent, batches)] = sent
                sent += 1
            a = self.link.next()
            if a is None:
                if time.monotonic() - since > PEER_TIMEOUT_S:
                    raise ProtocolError(f"evaluation batches {sorted(pending.values())} unanswered")
                continue
            self.link.ack(a)
            outcome = a.msg.get("outcome")
            if a.correlation_id in pending and outcome == "evaluated":
                del pending[a.correlation_id]
                if a.msg["metrics"]:
                    self.result.metrics[epoch] = dict(a.msg["metrics"])
            elif a.correlation_id in pending and outcome == "refused":
                raise ProtocolError(f"evaluation batch refused: {a.msg['error']}")
            elif a.correlation_id in pending and outcome == "rejoin":
                self.join()
                for i in pending.values():
                    self.send_eval(epoch, i, batches)

    def send_eval(self, epoch: int, i: int, batches: list[torch.Tensor]) -> str:
        rows = batches[i]
        with torch.no_grad():
            out = self.bottom(self.data.test_x[rows])                        # (B, 640)
        cid = f"{self.s.name}:eval:{epoch}:{i}"
        self.link.send("forward", i, cid, {"activations": out, "labels": self.data.test_y[rows],
                                           "sample_ids": self.data.test_ids[rows]}, self.result.applied,
                       train=False, epoch=epoch, eval_batches=len(batches), attempt=0)
        return cid
