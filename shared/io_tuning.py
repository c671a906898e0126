"""Small adjustments to how a process moves messages, kept out of the transport's logic.

**Receive size.** pika reads its socket ``_MAX_RECV_BYTES`` = 4 KB at a time and appends each
read to its frame buffer with ``bytes +=``, which copies the whole buffer every time: a
160 KB message costs ~40 reads and ~3 MB of copying, growing with the square of the message
size. Reading ``RECV_BYTES`` at a time keeps it to a few reads and copies per message (the
measurement is in docs/benchmarks.md, section "CPU per sample"). It is a class attribute of
pika's asynchronous transport, set once when ``shared.broker`` is imported; every other
pika behaviour is unchanged.

**Thread name.** The I/O thread's OS-level name (what ``top -H`` and ``/proc/<pid>/task/*/comm``
show) is set to ``pika-<party>``, so its CPU can be told apart from the loop's (Python does not
pass thread names to the OS before 3.14).

**Kept heap.** Message-sized buffers are allocated and freed every batch; glibc hands such
memory back to the kernel and faults it in again page by page (``keep_freed_memory``). The
parties (``workers.assemble.configure_process``) and the benchmark's raw pika ceiling set it alike.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

from pika.adapters.utils.io_services_utils import _AsyncTransportBase

from splitmq.shared import defaults

log = logging.getLogger(__name__)

#: Bytes per socket read. 4 KB (pika's default) copies quadratically; reads above glibc's mmap
#: threshold (128 KB) would map and unmap memory on every call.
RECV_BYTES = 64 * 1024
#: Environment variable overriding RECV_BYTES (0: keep pika's own 4 KB, e.g. to measure the difference).
RECV_BYTES_ENV = "SPLITMQ_PIKA_RECV_BYTES"
_PR_SET_NAME = 15

#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """Keep freed heap for the next message instead of handing it back to the kernel.

    A party allocates and frees message-sized buffers every batch (a bundle of four MLP
    gradients is 650 KB). glibc returns such memory to the kernel on free and faults it back in,
    one 4 KB page at a time, on the next allocation: ~5,000 page faults a second on a trainer,
    ~1.2 µs each on this machine. With these thresholds the buffers come from a heap that stays
    mapped, up to ``defaults.HEAP_KEEP_BYTES`` of it idle. A no-op off glibc.
    """
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError) as exc:  # not glibc: the allocator keeps its own ways
        log.debug("cannot tune the allocator: %s", exc)
        return
    mallopt(_M_MMAP_THRESHOLD, defaults.HEAP_KEEP_BYTES // 2)
    mallopt(_M_TRIM_THRESHOLD, defaults.HEAP_KEEP_BYTES)


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, loaded once (``OSError`` where there is none to load)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def tune_receive(recv_bytes: int | None = None) -> int:
    """Make pika's asynchronous transport read ``recv_bytes`` at a time (process-wide); by default
    ``RECV_BYTES``, or ``$SPLITMQ_PIKA_RECV_BYTES`` when set (0 leaves pika's default). Returns
    the read size in force."""
    if recv_bytes is None:
        try:
            recv_bytes = int(os.environ.get(RECV_BYTES_ENV, RECV_BYTES))
        except ValueError:
            log.warning("%s is not a number; reading %d bytes at a time", RECV_BYTES_ENV, RECV_BYTES)
            recv_bytes = RECV_BYTES
    if recv_bytes > 0:
        _AsyncTransportBase._MAX_RECV_BYTES = recv_bytes
    return int(_AsyncTransportBase._MAX_RECV_BYTES)


def name_thread(name: str) -> None:
    """Give the calling thread an OS-level name (15 bytes at most); a no-op where prctl is missing."""
    try:
        _libc().prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError) as exc:  # not Linux: names are only a convenience
        log.debug("cannot name thread %s: %s", name, exc)
