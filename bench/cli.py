"""``splitmq bench``: run the benchmark suite and write docs/benchmarks.md and .json.

``--quick`` is the CI smoke mode: every part runs briefly (a fraction of a second per timed
loop, one small splitmq job), so it proves the suite works and writes well-formed files;
its numbers mean nothing. The full run takes several minutes on a 2-core machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Protocol

from splitmq.bench import coalesce, compression, cpu, cpujobs, inference, report, sections, suite
from splitmq.bench.common import Scale

log = logging.getLogger(__name__)


class _Run(Protocol):
    def __call__(self, *, quick: bool, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]: ...


class Part(NamedTuple):
    """A part that runs on its own: its module's ``run`` and ``write`` (its section of the page and its
    own JSON file), and the log lines that sum its result up."""

    run: _Run
    write: Callable[[dict[str, Any], str, Path, Path], None]
    summary: Callable[[dict[str, Any]], list[str]]


def _inference_run(*, quick: bool, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    return inference.run(quick, workdir, Scale.of(quick).dataset, log=log)


PARTS = {
    "inference": Part(_inference_run, inference.write,
                      lambda r: [f"{model}: {row['ratios']}" for model, row in r["models"].items()]),
    "compression": Part(compression.run, compression.write, lambda r: [
        f"{row['activations']}/{row['gradients']}: {row['bytes_per_sample']:.0f} bytes/sample, accuracy "
        f"{row['accuracy']}, {row['cpu_us_per_sample']} µs/sample" for row in r["rows"]]),
    "cpu": Part(cpu.run, cpu.write,
                lambda r: [f"{key} = {r['ratios'][key]} (target <= {cpu.TARGETS[key]})" for key in cpu.TARGETS]),
    "coalesce": Part(coalesce.run, coalesce.write, lambda r: [
        f"coalesce {row['coalesce']} run {row['run']}: {row['messages_per_sample']:.4f} messages/sample, "
        f"{row['bytes_per_sample']:.0f} bytes/sample, {row['cpu_us_per_sample']} µs/sample, broker "
        f"{cpujobs.us(row['cpu_by_party'], 'broker')}, accuracy {row['accuracy']}" for row in r["rows"]]),
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="benchmark splitmq against local training, the broker and torch.rpc")
    p.add_argument("part", nargs="?", choices=("all", *PARTS), default="all",
                   help="all: the training suite, then cpu; inference: prediction latency and throughput; "
                        "compression: bytes, accuracy and CPU per sample of each compression at the cut; cpu: CPU "
                        "per sample per party against local training and the raw broker ceiling; coalesce: messages, "
                        "bytes and CPU per sample with coalesce 1 and 4 at K=4 (each a section of the same page, "
                        "kept when the suite regenerates it, and a JSON file of its own beside --out-json)")
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
    if args.part in PARTS:
        return _part(args, args.part)
    with _workdir(args, "splitmq-bench-") as workdir:
        result = suite.run(Scale.of(args.quick), workdir, log=log.info)
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


def _part(args: argparse.Namespace, name: str) -> int:
    """``splitmq bench <part>``: its own section of the page, and its own JSON file beside the suite's."""
    part = PARTS[name]
    with _workdir(args, f"splitmq-bench-{name}-") as workdir:
        result = part.run(quick=args.quick, workdir=workdir, log=log.info)
    command = command_line(args)
    result["command"] = command
    part.write(result, command, Path(args.out_md), _beside(Path(args.out_json), name))
    for line in part.summary(result):
        log.info("bench %s: %s", name, line)
    return 0


@contextlib.contextmanager
def _workdir(args: argparse.Namespace, prefix: str) -> Iterator[Path]:
    """--work-dir, or a temp dir gone at the end; pika kept quiet (readiness polls provoke expected 404s)."""
    logging.getLogger("pika").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(args.work_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir


def _beside(out_json: Path, part: str) -> Path:
    """A part's own JSON file next to the suite's: docs/benchmarks-<part>.json."""
    return out_json.with_name(f"{out_json.stem}-{part}.json")
