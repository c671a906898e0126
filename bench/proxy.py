"""A delaying TCP proxy on loopback: our stand-in for an edge link, since this kernel has no netem.

Every chunk read from one side is written to the other ``delay_s`` later, in order, without
waiting for the chunk before it to be delivered: a link with one-way latency ``delay_s`` and
loopback bandwidth, so pipelined messages overlap the way they do on a real long link.
Bounded: at most ``MAX_CONNECTIONS`` connections and ``MAX_CHUNKS_IN_TRANSIT`` chunks per
direction (reading pauses beyond it), and it binds to 127.0.0.1 only.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

MAX_CONNECTIONS = 64
MAX_CHUNKS_IN_TRANSIT = 1024
CHUNK_BYTES = 256 * 1024
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy one direction: a reader task stamps chunks, a writer task releases them when due."""
    transit: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(MAX_CHUNKS_IN_TRANSIT)

    async def read() -> None:
        while chunk := await reader.read(CHUNK_BYTES):
            await transit.put((time.monotonic() + delay_s, chunk))
        await transit.put((0.0, b""))

    async def write() -> None:
        while True:
            due, chunk = await transit.get()
            if not chunk:
                break
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


class DelayProxy:
    """Listen on 127.0.0.1 and forward to ``upstream`` with ``delay_s`` added each way.

    Use as a context manager; ``port`` is the listening port once entered.
    """

    def __init__(self, *, upstream_host: str, upstream_port: int, delay_s: float) -> None:
        if upstream_host not in _LOOPBACK:
            raise ValueError(f"the proxy forwards to loopback only, got {upstream_host!r}")
        if not 0 <= delay_s <= 1:
            raise ValueError(f"delay_s must be within 0..1 s, got {delay_s}")
        self.upstream = (upstream_host, upstream_port)
        self.delay_s = delay_s
        self.port = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._active = 0

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._active >= MAX_CONNECTIONS:
            client_w.close()
            return
        self._active += 1
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            self._active -= 1
            return
        try:
            await asyncio.gather(_pump(client_r, up_w, self.delay_s), _pump(up_r, client_w, self.delay_s))
        finally:
            self._active -= 1

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def __enter__(self) -> "DelayProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *_exc: Any) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # let them close their sockets first

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def proxied_url(url: str, port: int) -> str:
    """``url`` with its host:port replaced by the proxy's loopback port."""
    scheme, rest = url.split("://", 1)
    creds, _, tail = rest.rpartition("@")
    path = tail[tail.index("/"):] if "/" in tail else ""
    return f"{scheme}://{creds + '@' if creds else ''}127.0.0.1:{port}{path}"


def upstream_of(url: str) -> tuple[str, int]:
    """The host and port an AMQP URL points at (5672 when it names none)."""
    tail = url.split("://", 1)[1].rpartition("@")[2].split("/", 1)[0]
    host, _, port = tail.partition(":")
    return host or "localhost", int(port or 5672)
