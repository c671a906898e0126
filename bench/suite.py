"""Runs every benchmark part in one go and derives the ratios the report leads with.

The order matters on a shared machine: the cheap in-process parts first, then the broker
ceiling right before the splitmq jobs it is compared with, so both see the same load.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from splitmq.bench import ceiling, codec, jobs, local, peer_rpc, profile, wirebytes
from splitmq.bench.common import AMQP_URL, BATCH_SIZE, MODELS, Scale, machine

WINDOWS = (1, 2, 4, 8)
CLIENTS = (1, 2, 4, 8, 16)
#: Window used by the scale runs (the async default we recommend).
SCALE_WINDOW = 4
DELAYS_S = (0.010, 0.050)
EDGE_WINDOWS = (1, 4)


def job_specs(scale: Scale) -> list[jobs.JobSpec]:
    """Every splitmq job of the run (the profiled one is separate)."""
    if scale.quick:  # the profiled job alone, through the delaying proxy, exercises jobs and proxy
        return []
    # The CNN computes ~6x longer per sample than the MLP: one epoch gives as long a timed span.
    specs = [jobs.JobSpec(model=m, clients=1, in_flight=k, epochs=scale.epochs if m == "mlp" else 1)
             for m in MODELS for k in WINDOWS]
    # Each client gets 1/N of the data; N/2 epochs give every client >= 32 batches to time.
    specs += [jobs.JobSpec(model="mlp", clients=n, in_flight=SCALE_WINDOW, epochs=max(scale.epochs, n // 2))
              for n in CLIENTS if n > 1]
    specs += [jobs.JobSpec(model="mlp", clients=1, in_flight=k, epochs=1, delay_s=d)
              for d in DELAYS_S for k in EDGE_WINDOWS]
    return specs


def run(scale: Scale, workdir: Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """All parts; the result is what docs/benchmarks.json holds."""
    started = time.monotonic()
    out: dict[str, Any] = {"machine_at_start": machine(), "quick": scale.quick, "dataset": scale.dataset}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("local", lambda: local.run(scale)),
        ("codec", lambda: codec.run(scale)),
        ("peer_rpc", lambda: peer_rpc.run(scale)),
        ("ceiling", lambda: ceiling.run(AMQP_URL, scale)),
    ]
    for name, fn in steps:
        log(f"bench: {name}... ({time.monotonic() - started:.0f} s in)")
        out[name] = fn()
    out["jobs"] = []
    for spec in job_specs(scale):
        log(f"bench: splitmq {spec}... ({time.monotonic() - started:.0f} s in)")
        out["jobs"].append(jobs.aggregate(jobs.run_job(spec, workdir)))
    log("bench: profile of the synchronous path...")
    out["profile"] = profile.run(workdir, epochs=1 if scale.quick else scale.epochs, codec_result=out["codec"],
                                 delay_s=DELAYS_S[0] if scale.quick else 0.0, dataset=scale.dataset)
    out["bytes"] = wirebytes.table([*out["jobs"], out["profile"]["job"]], scale.dataset)
    out["ratios"] = ratios(out)
    out["machine"] = machine()
    out["seconds"] = time.monotonic() - started
    cleaned: dict[str, Any] = clean(out)
    return cleaned


def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The first job row whose spec fields equal ``match``."""
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _sps(row: dict[str, Any] | None) -> float | None:
    return row["samples_per_second"] if row else None


def ratios(r: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers, each ``None`` when its run was not part of this mode."""
    rows = r["jobs"]
    out: dict[str, Any] = {}
    for m in MODELS:
        loc = r["local"][m]["samples_per_second"]
        one = {"model": m, "clients": 1, "delay_s": 0.0}
        ceil = ceiling.best(r["ceiling"], m, "durable") * BATCH_SIZE
        out[m] = {
            "local_samples_per_second": loc,
            **{f"k{k}_over_local": _ratio(_sps(find(rows, in_flight=k, **one)), loc) for k in WINDOWS},
            "k4_over_durable_ceiling": _ratio(_sps(find(rows, in_flight=4, **one)), ceil),
            # The lower of the two limits: the broker's, or the model's own compute in one process.
            "k4_over_bound": _ratio(_sps(find(rows, in_flight=4, **one)), min(ceil, loc)),
            "durable_ceiling_samples_per_second": ceil,
            "transient_ceiling_samples_per_second": ceiling.best(r["ceiling"], m, "transient") * BATCH_SIZE,
            "rpc_over_local": _ratio(r["peer_rpc"].get(m, {}).get("samples_per_second"), loc),
            "sync_over_rpc": _ratio(_sps(find(rows, in_flight=1, **one)),
                                    r["peer_rpc"].get(m, {}).get("samples_per_second")),
        }
    for m in MODELS:
        peer = r["peer_rpc"].get(m, {}).get("samples_per_second")
        for mode in ceiling.MODES:
            one_in_flight = ceiling.at(r["ceiling"], m, mode, 1) * BATCH_SIZE
            out[m][f"{mode}_ceiling_k1_over_rpc"] = _ratio(one_in_flight, peer)
        out[m]["k4_over_durable_ceiling_at_4"] = _ratio(
            _sps(find(rows, model=m, clients=1, in_flight=4, delay_s=0.0)),
            ceiling.at(r["ceiling"], m, "durable", 4) * BATCH_SIZE)
    mlp_ceiling = out["mlp"]["durable_ceiling_samples_per_second"]
    out["clients16_over_durable_ceiling"] = _ratio(_sps(find(rows, model="mlp", clients=16)), mlp_ceiling)
    for d in DELAYS_S:
        k1 = find(rows, model="mlp", clients=1, in_flight=1, delay_s=d)
        k4 = find(rows, model="mlp", clients=1, in_flight=4, delay_s=d)
        out[f"k4_over_k1_at_{round(d * 1000)}ms"] = _ratio(_sps(k4), _sps(k1))
    out["codec_over_memcpy"] = r["codec"]["mlp"]["ratio_to_memcpy"]
    return out


def clean(value: Any) -> Any:
    """NaN and infinities become None, so the JSON file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value
