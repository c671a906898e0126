"""Part 2: the broker ceiling. A raw pika round trip of one batch's message sizes, no splitmq code.

A driver publishes a Forward-sized body to a request queue; an echo process (its own Python
process, as the trainer is) consumes it and publishes a Backward-sized body to a reply queue;
the driver consumes that and publishes the next. Round trips per second with 1, 4 and 8 in
flight is what the broker itself allows, in two durability modes:

* ``durable``: quorum queues, persistent messages, publisher confirms, manual acks: what
  splitmq uses (a message survives a broker crash once confirmed; a replica set holds it).
* ``transient``: classic non-durable queues, non-persistent messages, confirms and acks kept.
  It gives up crash safety: a broker restart loses the queues and every message in them.

Both sides run with asynchronous confirms (``SelectConnection``), so publishes pipeline, and
read their socket and keep their freed heap as splitmq's parties do (``shared.io_tuning``: 64 KB
at a time; buffers not faulted in again each message), so the ceiling's CPU compares with
theirs. The queues are the benchmark's own (unique names) and are deleted afterwards.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from typing import Any, Callable

import pika

from splitmq.shared import io_tuning

MODES = ("durable", "transient")
IN_FLIGHT = (1, 4, 8)
_STOP = "stop"


def _declare(url: str, names: list[str], mode: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        for name in names:
            if mode == "durable":
                ch.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
            else:
                ch.queue_declare(name, durable=False, arguments={"x-queue-type": "classic"})
    finally:
        conn.close()


def _delete(url: str, names: list[str]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for name in names:
            conn.channel().queue_delete(name)
    finally:
        conn.close()


class _Side:
    """One end of the round trip on a pika SelectConnection; ``on_body`` decides what to send."""

    def __init__(self, url: str, *, consume: str, mode: str, prefetch: int) -> None:
        self.consume_queue = consume
        self.delivery_mode = 2 if mode == "durable" else 1
        self.prefetch = prefetch
        self.chan: Any = None
        self.nacks = 0
        self.conn = pika.SelectConnection(pika.URLParameters(url), on_open_callback=self._opened,
                                          on_open_error_callback=self._closed, on_close_callback=self._closed)

    def _closed(self, _conn: Any, _reason: Any) -> None:
        self.conn.ioloop.stop()

    def _opened(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._channel)

    def _channel(self, chan: Any) -> None:
        self.chan = chan
        chan.confirm_delivery(self._confirm)
        chan.basic_qos(prefetch_count=self.prefetch, callback=lambda _f: chan.basic_consume(
            self.consume_queue, self._deliver, callback=lambda _f: self.started()))

    def _confirm(self, frame: Any) -> None:
        if isinstance(frame.method, pika.spec.Basic.Nack):
            self.nacks += 1

    def publish(self, queue: str, body: bytes, message_id: str) -> None:
        props = pika.BasicProperties(delivery_mode=self.delivery_mode, message_id=message_id,
                                     content_type="application/octet-stream")
        self.chan.basic_publish("", queue, body, props, mandatory=True)

    def _deliver(self, chan: Any, method: Any, props: Any, body: bytes) -> None:
        chan.basic_ack(method.delivery_tag)
        self.on_message(props.message_id or "", body)

    def started(self) -> None:
        """The consumer is registered."""

    def on_message(self, message_id: str, body: bytes) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.conn.close()


class _Echo(_Side):
    """The trainer's stand-in: every request gets a reply of the gradient's size."""

    def __init__(self, url: str, *, requests: str, replies: str, mode: str, reply_bytes: int) -> None:
        super().__init__(url, consume=requests, mode=mode, prefetch=64)
        self.replies = replies
        self.reply = bytes(reply_bytes)

    def started(self) -> None:
        print("ready", flush=True)

    def on_message(self, message_id: str, body: bytes) -> None:
        if message_id == _STOP:
            self.stop()
            return
        self.publish(self.replies, self.reply, message_id)


class _Driver(_Side):
    """The worker's stand-in: keeps ``in_flight`` requests out for ``seconds``, timing each."""

    def __init__(self, url: str, *, requests: str, replies: str, mode: str, request_bytes: int,
                 in_flight: int, seconds: float) -> None:
        super().__init__(url, consume=replies, mode=mode, prefetch=max(16, in_flight))
        self.requests = requests
        self.body = bytes(request_bytes)
        self.in_flight = in_flight
        self.seconds = seconds
        self.sent: dict[str, float] = {}
        self.rtts: list[float] = []
        self.start = self.end = 0.0
        self.next_id = 0

    def started(self) -> None:
        self.start = time.perf_counter()
        for _ in range(self.in_flight):
            self._send()

    def _send(self) -> None:
        mid = str(self.next_id)
        self.next_id += 1
        self.sent[mid] = time.perf_counter()
        self.publish(self.requests, self.body, mid)

    def on_message(self, message_id: str, body: bytes) -> None:
        now = time.perf_counter()
        self.rtts.append(now - self.sent.pop(message_id))
        if now - self.start < self.seconds:
            self._send()
        elif not self.sent:
            self.end = now
            self.publish(self.requests, b"", _STOP)
            self.stop()


def round_trips(url: str, *, mode: str, in_flight: int, request_bytes: int, reply_bytes: int,
                seconds: float, on_start: Callable[[int, "_Driver"], None] | None = None) -> dict[str, Any]:
    """Round trips/s through fresh queues in ``mode`` with ``in_flight`` outstanding.

    ``on_start(echo_pid, driver)`` (if given) is called once both sides exist, just before the
    driver's I/O loop takes over this thread (``bench.cpu`` starts its CPU sampler there).
    """
    io_tuning.tune_receive()
    io_tuning.keep_freed_memory()
    tag = uuid.uuid4().hex[:10]
    requests, replies = f"bench.ceiling.{tag}.requests", f"bench.ceiling.{tag}.replies"
    _declare(url, [requests, replies], mode)
    echo = subprocess.Popen(
        [sys.executable, "-m", "splitmq.bench.ceiling", "--url", url, "--requests", requests, "--replies", replies,
         "--mode", mode, "--reply-bytes", str(reply_bytes)], stdout=subprocess.PIPE, text=True)
    try:
        if echo.stdout is None or echo.stdout.readline().strip() != "ready":
            raise RuntimeError("the ceiling's echo process did not start")
        driver = _Driver(url, requests=requests, replies=replies, mode=mode, request_bytes=request_bytes,
                         in_flight=in_flight, seconds=seconds)
        if on_start is not None:
            on_start(echo.pid, driver)
        driver.conn.ioloop.start()
        echo.wait(timeout=30)
    finally:
        if echo.poll() is None:
            echo.terminate()
            echo.wait(timeout=10)
        _delete(url, [requests, replies])
    from splitmq.bench.common import percentile  # torch-free modules stay torch-free for the echo side

    elapsed = driver.end - driver.start
    return {"mode": mode, "in_flight": in_flight, "request_bytes": request_bytes, "reply_bytes": reply_bytes,
            "round_trips": len(driver.rtts), "seconds": elapsed, "per_second": len(driver.rtts) / elapsed,
            "rtt_p50_s": percentile(driver.rtts, 0.5), "rtt_p99_s": percentile(driver.rtts, 0.99),
            "nacks": driver.nacks}


def run(url: str, scale: Any) -> dict[str, Any]:
    """Every mode x in-flight row for each model's message sizes (quick: the MLP only)."""
    from splitmq.bench.common import MODELS, message_bodies

    rows = []
    for model in MODELS[:1] if scale.quick else MODELS:
        up, down = message_bodies(model)
        for mode in MODES:
            for k in IN_FLIGHT:
                row = round_trips(url, mode=mode, in_flight=k, request_bytes=len(up), reply_bytes=len(down),
                                  seconds=scale.seconds)
                rows.append({"model": model, **row})
    return {"rows": rows}


def best(result: dict[str, Any], model: str, mode: str) -> float:
    """The ceiling: the most round trips/s any in-flight setting reached for ``model`` in ``mode``."""
    rates = [r["per_second"] for r in result["rows"] if r["model"] == model and r["mode"] == mode]
    return max(rates) if rates else float("nan")


def at(result: dict[str, Any], model: str, mode: str, in_flight: int) -> float:
    """Round trips/s of one row; NaN when that row was not run."""
    rates = [r["per_second"] for r in result["rows"]
             if r["model"] == model and r["mode"] == mode and r["in_flight"] == in_flight]
    return rates[0] if rates else float("nan")


def markdown(result: dict[str, Any]) -> list[str]:
    lines = ["| model | mode | in flight | bytes up / down | round trips/s | samples/s (x64) | p50 ms | p99 ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['mode']} | {r['in_flight']} | {r['request_bytes']:,} / "
                     f"{r['reply_bytes']:,} | {r['per_second']:,.0f} | {r['per_second'] * 64:,.0f} "
                     f"| {r['rtt_p50_s'] * 1e3:.1f} | {r['rtt_p99_s'] * 1e3:.1f} |")
    return lines


def _echo_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="echo side of the broker ceiling benchmark")
    p.add_argument("--url", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--replies", required=True)
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--reply-bytes", type=int, required=True)
    a = p.parse_args(argv)
    io_tuning.tune_receive()
    io_tuning.keep_freed_memory()
    echo = _Echo(a.url, requests=a.requests, replies=a.replies, mode=a.mode, reply_bytes=a.reply_bytes)
    echo.conn.ioloop.start()
    return 0


if __name__ == "__main__":
    sys.exit(_echo_main(sys.argv[1:]))
