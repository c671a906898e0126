"""Part 5: the codec. ``shared.wire`` encode + decode of one 64x640 float32 Forward, against a
plain memory copy of the same bytes.

The ratio is ``memcpy time / (encode + decode time)`` for the same tensor bytes: 1.0 would
mean the envelope costs no more than copying the payload once.
"""
from __future__ import annotations

import cProfile
import io
import pstats
import time
from typing import Any, Callable

import torch

from splitmq.bench.common import BATCH_SIZE, Scale, cut_numel, set_threads
from splitmq.shared import wire

#: Target from the issue: encode + decode at least half as fast as one memcpy.
TARGET_RATIO = 0.5


def _forward(model: str) -> wire.Forward:
    acts = torch.randn(BATCH_SIZE, cut_numel(model))  # (64, 640) for the MLP
    return wire.Forward(job_id="bench", client_id="client-0", seq=1, activations=acts,
                        labels=torch.zeros(BATCH_SIZE, dtype=torch.int64))


def _time_per_call(fn: Callable[[], object], seconds: float) -> float:
    """Mean seconds per call of ``fn`` over about ``seconds`` (best of three slices)."""
    best = float("inf")
    for _ in range(3):
        n = 0
        start = time.perf_counter()
        while True:
            for _ in range(50):
                fn()
            n += 50
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / 3:
                break
        best = min(best, elapsed / n)
    return best


def measure(model: str, seconds: float) -> dict[str, Any]:
    """Encode, decode and memcpy timings (seconds per call) of one batch's Forward."""
    set_threads()
    msg = _forward(model)
    body = msg.encode()
    payload = msg.activations.numpy().tobytes()
    dst = bytearray(len(payload))

    def memcpy() -> None:
        dst[:] = payload  # one copy of the tensor bytes

    enc = _time_per_call(msg.encode, seconds)
    dec = _time_per_call(lambda: wire.decode(body), seconds)
    cpy = _time_per_call(memcpy, seconds)
    return {
        "model": model, "tensor_bytes": len(payload), "message_bytes": len(body),
        "encode_s": enc, "decode_s": dec, "memcpy_s": cpy,
        "codec_mb_per_s": len(payload) / (enc + dec) / 1e6, "memcpy_mb_per_s": len(payload) / cpy / 1e6,
        "ratio_to_memcpy": cpy / (enc + dec), "target_ratio": TARGET_RATIO,
    }


def profile(model: str = "mlp", calls: int = 2000) -> str:
    """The top of a cProfile of encode + decode, for the report when the target is missed."""
    msg = _forward(model)
    body = msg.encode()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        msg.encode()
        wire.decode(body)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(8)
    return out.getvalue()


def run(scale: Scale) -> dict[str, Any]:
    result: dict[str, Any] = {"mlp": measure("mlp", scale.seconds / 2), "cnn": measure("cnn", scale.seconds / 2)}
    if result["mlp"]["ratio_to_memcpy"] < TARGET_RATIO:
        result["profile_mlp"] = profile(calls=200 if scale.quick else 2000)
    return result


def markdown(result: dict[str, Any]) -> list[str]:
    lines = ["| model | tensor bytes | encode µs | decode µs | memcpy µs | codec MB/s | memcpy MB/s "
             "| codec / memcpy |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("mlp", "cnn"):
        r = result[name]
        lines.append(f"| {name} | {r['tensor_bytes']:,} | {r['encode_s'] * 1e6:.1f} | {r['decode_s'] * 1e6:.1f} "
                     f"| {r['memcpy_s'] * 1e6:.1f} | {r['codec_mb_per_s']:,.0f} | {r['memcpy_mb_per_s']:,.0f} "
                     f"| {r['ratio_to_memcpy']:.2f} |")
    return lines
