"""What every party process sets up before it computes (``workers.assemble.configure_process``)."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

#: One turn of a trainer at K=4, as the allocator sees it: four MLP gradients, each encoded, and
#: the bundle that carries them, allocated and freed. Prints the page faults of 200 turns.
_TURNS = """
import resource, sys
import msgpack, torch
from splitmq.workers import assemble
if sys.argv[1] == "party":
    assemble.configure_process(1, "cpu")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def turn():
    gradients = [torch.randn(64, 640) for _ in range(4)]
    parts = [msgpack.packb({"data": g.numpy().data}) for g in gradients]
    msgpack.packb({"parts": parts})
turn()
before = faults()
for _ in range(200):
    turn()
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _TURNS, mode], check=True, capture_output=True, text=True,
                         timeout=300)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's")
def test_a_party_keeps_freed_message_buffers_instead_of_faulting_them_in_again() -> None:
    # Given a process that allocates and frees message-sized buffers turn after turn
    # When it runs as a plain Python process, and as a party after its set-up
    plain, party = _faults("plain"), _faults("party")
    # Then the plain one faults its buffers back in, page by page, every turn; the party hardly ever
    assert plain > 200 * 100, plain
    assert party < 2000, party
