"""Part 7: the peer. The same split training over PyTorch's own ``torch.distributed.rpc``.

Two processes on loopback: rank 0 holds the bottom segment and the data, rank 1 the top
segment and the loss, exactly as a splitmq worker and trainer do. Each step the bottom sends
its cut activations and labels with ``rpc_sync``; the top runs forward, loss, backward and
its SGD step and returns the activations' gradient. Same model, data, batch size, learning
rate and thread setting as every other contender. (torch.rpc serialises calls with pickle,
one reason splitmq does not build on it; here it is only the yardstick.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import torch
import torch.distributed.rpc as rpc
from torch import nn

from splitmq.bench.common import LR, dataset, free_port, set_threads, thread_env, timed_training
from splitmq.shared import models

_TOP: dict[str, Any] = {}


def top_step(activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Runs on rank 1: one step of the top segment; returns d(loss)/d(activations) and the loss."""
    top, opt = _TOP["model"], _TOP["opt"]
    acts = activations.requires_grad_()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.nll_loss(top(acts), labels)
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    assert acts.grad is not None  # backward just filled it
    return acts.grad, float(loss.detach())


def _bottom_loop(model: str, seconds: float, dataset_name: str, warmup_steps: int = 5) -> dict[str, Any]:
    """Runs on rank 0: train the bottom segment for about ``seconds`` after a warm-up."""
    bottom = models.build_segments(model)[0]
    opt = torch.optim.SGD(bottom.parameters(), lr=LR)
    train = dataset(dataset_name).train

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        acts = bottom(x)  # (B, cut)
        grad, loss = rpc.rpc_sync("trainer", top_step, args=(acts.detach(), y))
        acts.backward(grad)
        opt.step()
        return float(loss)

    return {"model": model, **timed_training(train, step, seconds=seconds, warmup_steps=warmup_steps)}


def _party_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="one party of the torch.distributed.rpc peer benchmark")
    p.add_argument("--rank", type=int, choices=(0, 1), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--dataset", required=True)
    a = p.parse_args(argv)
    set_threads()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port))
    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=4, rpc_timeout=120, init_method=f"tcp://127.0.0.1:{a.port}")
    if a.rank == 1:
        _TOP["model"] = models.build_segments(a.model)[1]
        _TOP["opt"] = torch.optim.SGD(_TOP["model"].parameters(), lr=LR)
    rpc.init_rpc("trainer" if a.rank == 1 else "client", rank=a.rank, world_size=2,  # type: ignore[no-untyped-call]
                 rpc_backend_options=opts)
    if a.rank == 0:
        print(json.dumps(_bottom_loop(a.model, a.seconds, a.dataset)), flush=True)
    rpc.shutdown()
    return 0


def train(model: str, seconds: float, dataset_name: str) -> dict[str, Any]:
    """Run both parties as subprocesses; the bottom's samples/s over its timed span."""
    port = free_port()
    cmd = [sys.executable, "-m", "splitmq.bench.peer_rpc", "--port", str(port), "--model", model, "--seconds", str(seconds),
           "--dataset", dataset_name]
    top = subprocess.Popen([*cmd, "--rank", "1"], env=thread_env(), stdout=subprocess.DEVNULL)
    try:
        out = subprocess.run([*cmd, "--rank", "0"], env=thread_env(), capture_output=True, text=True,
                             timeout=120 + seconds)
        if out.returncode != 0:
            raise RuntimeError(f"torch.rpc bottom party failed: {out.stderr[-2000:]}")
        top.wait(timeout=60)
    finally:
        if top.poll() is None:
            top.terminate()
            top.wait(timeout=10)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run(scale: Any) -> dict[str, Any]:
    from splitmq.bench.common import MODELS

    return {name: train(name, scale.seconds, scale.dataset) for name in (MODELS[:1] if scale.quick else MODELS)}


if __name__ == "__main__":
    sys.exit(_party_main(sys.argv[1:]))
