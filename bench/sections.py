"""Marked sections of the benchmark page: the parts other commands write.

``splitmq bench`` regenerates docs/benchmarks.md from its own run. ``splitmq bench inference``,
``splitmq bench compression``, ``splitmq bench cpu`` and measurements taken by hand (e.g. NoPeek's
cost, the CPU profile of ``bench.cpuprofile``) own sections
between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``: each command replaces its own
section, and a regeneration carries every other one over unchanged.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_SECTION = re.compile(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", re.S)


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of section ``name``."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def keep(old: str, new: str) -> str:
    """``new`` (a regenerated page) with every marked section of ``old`` that it lacks, in order."""
    out = new.rstrip("\n")
    for m in _SECTION.finditer(old):
        if markers(m.group(1))[0] not in new:
            out += "\n\n" + m.group(0)
    return out + "\n"


def write(name: str, section: str, result: dict[str, Any], out_md: Path, out_json: Path) -> None:
    """Replace (or append) section ``name`` of ``out_md`` with ``section``; raw results in ``out_json``."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    old = out_md.read_text() if out_md.exists() else "# Benchmarks\n"
    start, end = markers(name)
    if start in old and end in old:
        page = old[:old.index(start)] + section.rstrip("\n") + old[old.index(end) + len(end):]
    else:
        page = old.rstrip("\n") + "\n\n" + section
    out_md.write_text(page if page.endswith("\n") else page + "\n")
