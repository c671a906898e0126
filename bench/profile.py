"""Part 8: where a synchronous step's time goes.

One synchronous (K=1) MLP job runs with its worker under cProfile. cProfile sees the
worker's main thread, which does all the model work; pika runs on its own thread, so its
share appears as ``waiting`` (the main thread blocked on the inbox until the gradient comes
back). ``waiting`` is then split with the trainer's own numbers: its measured compute per
step (``splitmq_step_seconds``) and its codec cost (the codec benchmark's decode of a
Forward + encode of a Backward); what remains is the broker and both sides' pika threads.
"""
from __future__ import annotations

import pstats
from pathlib import Path
from typing import Any

from splitmq.bench import jobs
from splitmq.bench.common import DATASET

#: (category, module path suffix, function name): cumulative main-thread time of the function.
_CATEGORIES = (
    ("compute: bottom forward", "shared/stage.py", "forward"),
    ("compute: bottom backward + SGD step", "shared/stage.py", "backward"),
    ("encode Forward", "shared/wire.py", "encode"),
    ("publish hand-off to pika thread", "shared/broker.py", "publish"),
    ("decode Backward", "shared/wire.py", "decode"),
    ("validate", "shared/validate.py", "check_gradient"),
    ("checkpoint (held acks)", "workers/party.py", "_checkpoint"),
    ("waiting for the gradient", "queue.py", "get"),
)


def _cumtime(stats: pstats.Stats, suffix: str, name: str) -> float:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]  # pstats keeps it untyped
    return float(sum(v[3] for (file, _line, func), v in raw.items() if file.endswith(suffix) and func == name))


def summarise(prof_path: Path, batches: int, trainer_step_s: float, trainer_codec_s: float) -> dict[str, Any]:
    """Per-step milliseconds by category from the worker's profile plus the trainer's numbers."""
    stats = pstats.Stats(str(prof_path))
    total = _cumtime(stats, "workers/party.py", "run")
    setup = _cumtime(stats, "workers/party.py", "_take_lease") + _cumtime(stats, "workers/party.py", "_restore")
    rows = {name: _cumtime(stats, suffix, func) for name, suffix, func in _CATEGORIES}
    loop = max(1e-9, total - setup)
    rows["other worker Python"] = max(0.0, loop - sum(rows.values()))
    per_step = {k: v / batches * 1e3 for k, v in rows.items()}
    wait_ms = per_step["waiting for the gradient"]
    trainer_ms = {"trainer compute (top forward+loss+backward+step)": trainer_step_s * 1e3,
                  "trainer decode Forward + encode Backward": trainer_codec_s * 1e3}
    broker_ms = max(0.0, wait_ms - sum(trainer_ms.values()))
    return {"batches": batches, "loop_seconds": loop, "step_ms": loop / batches * 1e3,
            "worker_ms": per_step, "waiting_split_ms": {**trainer_ms,
                                                        "broker + pika threads + scheduling": broker_ms},
            "top_functions": _top(stats, batches)}


def _top(stats: pstats.Stats, batches: int, n: int = 12) -> list[dict[str, Any]]:
    """splitmq's per-step functions (called at least every other step) by cumulative time."""
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    ours = [kv for kv in raw.items() if any(part in kv[0][0] for part in ("/shared/", "/workers/"))
            and kv[1][1] >= batches // 2]
    ranked = sorted(ours, key=lambda kv: kv[1][3], reverse=True)[:n]
    return [{"function": f"{Path(file).name}:{line}({func})", "calls": v[1], "tottime_s": v[2], "cumtime_s": v[3]}
            for (file, line, func), v in ranked]


def run(workdir: Path, *, epochs: int, codec_result: dict[str, Any], delay_s: float = 0.0,
        dataset: str = DATASET) -> dict[str, Any]:
    """Profile one synchronous MLP job and summarise it."""
    prof = workdir / "worker-sync.prof"
    spec = jobs.JobSpec(model="mlp", clients=1, in_flight=1, epochs=epochs, delay_s=delay_s, dataset=dataset)
    result = jobs.run_job(spec,
                          workdir, worker_prefix=("-m", "cProfile", "-o", str(prof)))
    row = jobs.aggregate(result)
    codec = codec_result["mlp"]
    trainer_codec = codec["decode_s"] + codec["encode_s"]  # a Backward is the same size as a Forward
    summary = summarise(prof, result["workers"][0]["batches"], row["trainer_step_mean_s"], trainer_codec)
    return {"job": row, **summary, "note": "worker under cProfile runs slower than unprofiled"}


def markdown(result: dict[str, Any]) -> list[str]:
    delay = result["job"]["delay_s"]
    link = f", {delay * 1e3:.0f} ms added one-way latency" if delay else ""
    lines = [f"Synchronous MLP, one client{link}, {result['batches']} steps, {result['step_ms']:.2f} ms per step "
             "on the worker's main thread (under cProfile).", "",
             "| where | ms per step | share |", "|---|---:|---:|"]
    step = result["step_ms"] or float("nan")
    for name, ms in result["worker_ms"].items():
        lines.append(f"| worker: {name} | {ms:.2f} | {ms / step:.0%} |")
    for name, ms in result["waiting_split_ms"].items():
        lines.append(f"| ↳ of the wait: {name} | {ms:.2f} | {ms / step:.0%} |")
    lines += ["", "splitmq functions called every step, by cumulative time (worker main thread):", "",
              "| function | calls | own s | cumulative s |", "|---|---:|---:|---:|"]
    for f in result["top_functions"]:
        lines.append(f"| `{f['function']}` | {f['calls']:,} | {f['tottime_s']:.3f} | {f['cumtime_s']:.3f} |")
    return lines
