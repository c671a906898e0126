"""``splitmq bench``: run the benchmark suite and write docs/benchmarks.md and .json.

``--quick`` is the CI smoke mode: every part runs briefly (a fraction of a second per timed
loop, one small splitmq job), so it proves the suite works and writes well-formed files;
its numbers mean nothing. The full run takes several minutes on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import tempfile
from pathlib import Path

from splitmq.bench import compression, cpu, inference, report, sections, suite
from splitmq.bench.common import Scale

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="benchmark splitmq against local training, the broker and torch.rpc")
    p.add_argument("part", nargs="?", choices=("all", "inference", "compression", "cpu"), default="all",
                   help="all: the training suite, then cpu; inference: prediction latency and throughput; "
                        "compression: bytes, accuracy and CPU per sample of each compression at the cut; cpu: CPU "
                        "per sample per party against local training and the raw broker ceiling (each a section "
                        "of the same page, kept when the suite regenerates it)")
    p.add_argument("--quick", action="store_true", help="smoke mode for CI: seconds, not minutes; numbers meaningless")
    p.add_argument("--out-md", default="docs/benchmarks.md", help="report path (default docs/benchmarks.md)")
    p.add_argument("--out-json", default="docs/benchmarks.json", help="raw results (default docs/benchmarks.json)")
    p.add_argument("--work-dir", default=None, help="where jobs keep checkpoints and summaries (default: a temp dir)")
    p.set_defaults(func=main)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, as a user would type it."""
    parts = ["splitmq", "bench"] + ([args.part] if args.part != "all" else [])
    if args.quick:
        parts.append("--quick")
    parts += ["--out-md", args.out_md, "--out-json", args.out_json]
    return shlex.join(parts)


def main(args: argparse.Namespace) -> int:
    if args.part == "inference":
        return _inference(args)
    if args.part == "compression":
        return _compression(args)
    if args.part == "cpu":
        return _cpu(args)
    scale = Scale.of(args.quick)
    logging.getLogger("pika").setLevel(logging.ERROR)  # readiness polls provoke expected 404 warnings
    with tempfile.TemporaryDirectory(prefix="splitmq-bench-") as tmp:
        workdir = Path(args.work_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = suite.run(scale, workdir, log=log.info)
        cpu_result = cpu.run(quick=args.quick, workdir=workdir, log=log.info)
    command = command_line(args)
    result["command"] = command
    result["cpu_ratios"] = cpu_result["ratios"]  # the whole cpu part: its own JSON file, as `bench cpu` writes it
    out_json, out_md = Path(args.out_json), Path(args.out_md)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    old = out_md.read_text() if out_md.exists() else ""
    out_md.write_text(sections.keep(old, report.render(result, command)))
    cpu_result["command"] = command
    cpu.write(cpu_result, command, out_md, _beside(out_json, "cpu"))
    log.info("bench: wrote %s and %s in %.0f s", out_md, out_json, result["seconds"])
    for key, value in sorted(result["ratios"].items()):
        log.info("bench: %s = %s", key, value)
    return 0


def _inference(args: argparse.Namespace) -> int:
    """``splitmq bench inference``: its own section of the page, and its own JSON file."""
    scale = Scale.of(args.quick)
    logging.getLogger("pika").setLevel(logging.ERROR)
    out_json = Path(args.out_json).with_name(Path(args.out_json).stem + "-inference.json")
    with tempfile.TemporaryDirectory(prefix="splitmq-bench-inference-") as tmp:
        workdir = Path(args.work_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = inference.run(scale.quick, workdir, scale.dataset, log=log.info)
    command = command_line(args)
    result["command"] = command
    inference.write(result, command, Path(args.out_md), out_json)
    for model, row in result["models"].items():
        log.info("bench inference: %s: %s", model, row["ratios"])
    return 0


def _compression(args: argparse.Namespace) -> int:
    """``splitmq bench compression``: its own section of the page, and its own JSON file."""
    logging.getLogger("pika").setLevel(logging.ERROR)
    out_json = _beside(Path(args.out_json), "compression")
    with tempfile.TemporaryDirectory(prefix="splitmq-bench-compression-") as tmp:
        workdir = Path(args.work_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = compression.run(quick=args.quick, workdir=workdir, log=log.info)
    command = command_line(args)
    result["command"] = command
    compression.write(result, command, Path(args.out_md), out_json)
    for row in result["rows"]:
        log.info("bench compression: %s/%s: %.0f bytes/sample, accuracy %s, %s µs/sample", row["activations"],
                 row["gradients"], row["bytes_per_sample"], row["accuracy"], row["cpu_us_per_sample"])
    return 0


def _cpu(args: argparse.Namespace) -> int:
    """``splitmq bench cpu``: its own section of the page, and its own JSON file."""
    logging.getLogger("pika").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="splitmq-bench-cpu-") as tmp:
        workdir = Path(args.work_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = cpu.run(quick=args.quick, workdir=workdir, log=log.info)
    command = command_line(args)
    result["command"] = command
    cpu.write(result, command, Path(args.out_md), _beside(Path(args.out_json), "cpu"))
    for key in cpu.TARGETS:
        log.info("bench cpu: %s = %s (target <= %s)", key, result["ratios"][key], cpu.TARGETS[key])
    return 0


def _beside(out_json: Path, part: str) -> Path:
    """A part's own JSON file next to the suite's: docs/benchmarks-<part>.json."""
    return out_json.with_name(f"{out_json.stem}-{part}.json")
