"""``splitmq export``: the whole trained model, assembled only with every segment holder's consent.

The requester asks each other holder, through the broker, for its segment (``roles.export``);
a holder answers with it only if it approved that requester for this job (``splitmq
approve-export`` on its side). With every segment in hand, the requester chains them
(``shared.local.Chain`` / ``VerticalChain``) and writes a standard PyTorch file: the unsplit
model's ``state_dict`` and the job's config, loadable with ``torch.load(weights_only=True)``
(``load_model`` rebuilds the module). Without every approval nothing is written and the
refusal lists who has not approved. ``--segment-only`` instead exports this party's own
segments alone for deployment: ``torch.export`` (default), TorchScript, or ONNX when the
``onnx`` package is installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from splitmq.shared import checkpoint, config, defaults, local, topology
from splitmq.shared.broker import Broker
from splitmq.shared.config import OWNER_HEAD, JobConfig
from splitmq.shared.errors import ConfigError
from splitmq.workers import assemble, segments
from splitmq.workers.party import LoopOptions, Party
from splitmq.workers.roles.export import ExportClient
from splitmq.workers.stats import Stats

FORMAT = "splitmq-export/1"
FORMATS = ("export", "torchscript", "onnx")


def plan(cfg: JobConfig, owner: str) -> list[tuple[str, int]]:
    """Who holds each segment of the unsplit model, as ``(holder, chain index)``; ``owner`` gives the
    bottom (and a U-shaped head) when owners each hold their own."""
    if cfg.vertical_parts:
        return [(topology.client_name(i), 0) for i in range(cfg.vertical_parts)] + [(cfg.stages[0], 1)]
    out = [(owner, 0)] + [(s, i + 1) for i, s in enumerate(cfg.stages) if s != OWNER_HEAD]
    return out + ([(owner, cfg.segment_count - 1)] if cfg.u_shaped else [])


def unsplit(cfg: JobConfig) -> nn.Module:
    """The unsplit model of ``cfg`` with fresh weights, laid out as the export's ``state_dict`` is."""
    if cfg.vertical_parts:
        bottoms = [assemble.segment(cfg, 0, party=i) for i in range(cfg.vertical_parts)]
        return local.VerticalChain(bottoms, assemble.segment(cfg, 1), cfg.combine)
    return local.Chain([assemble.segment(cfg, i) for i in range(cfg.segment_count)])


def assemble_model(cfg: JobConfig, parts: Mapping[tuple[str, int], Mapping[str, torch.Tensor]]) -> nn.Module:
    """Chain the holders' segments (every ``plan`` entry must be in ``parts``)."""
    model = unsplit(cfg)
    owner = next(h for h, i in parts if i == 0) if not cfg.vertical_parts else ""
    for holder, index in plan(cfg, owner):
        if isinstance(model, local.VerticalChain):
            target = model.bottoms[topology.client_index(holder) or 0] if index == 0 else model.top
        else:
            assert isinstance(model, local.Chain)
            target = model.segments[index]
        target.load_state_dict(dict(parts[(holder, index)]))
    return model.eval()


def load_model(path: str | Path) -> tuple[nn.Module, JobConfig]:
    """An exported model, rebuilt (its code comes from this machine: the config names it)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a splitmq export ({saved.get('format')!r})")
    cfg = config.load(None, saved["config"], environ={})
    model = unsplit(cfg)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), cfg


def request(cfg: JobConfig, *, requester: str, owner: str, amqp_url: str, run_dir: str | None,
            checkpoint_dir: str | None, timeout_s: float = defaults.EXPORT_TIMEOUT_S,
            tls: Mapping[str, str] | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """The export file's content, or None and every holder's reason for not giving its segment."""
    wanted = plan(cfg, owner)
    own: dict[int, Any] = {}
    if any(h == requester for h, _ in wanted):
        own = segments.held(cfg, requester, run_dir=run_dir or f"runs/{cfg.job_id}", checkpoint_dir=checkpoint_dir)
    asks = [(h, i) for h, i in wanted if h != requester]
    client = ExportClient(job_id=cfg.job_id, me=requester, asks=asks, timeout_s=timeout_s)
    loop = LoopOptions(name=requester, job_id=cfg.job_id, primary=client.name,
                       layout=topology.job_layout(cfg.job_id, stages=(), parties=(), serving=(requester,)))
    transport = Broker(amqp_url, name=requester, tls=tls, lease=topology.serve_lease(cfg.job_id, requester))
    if asks:
        outcome = Party([client], transport, loop, stats=Stats()).run()
        if any(not a.answered for a in client.asked.values()):
            return None, [f"{requester}: {outcome.detail}"]
    refusals = [a.error for a in client.asked.values() if a.error]
    if refusals:
        return None, refusals
    parts = {(a.holder, a.segment): a.tensors for a in client.asked.values() if a.tensors is not None}
    parts.update({(requester, i): own[i] for h, i in wanted if h == requester and i in own})
    missing = [f"{h} segment {i}" for h, i in wanted if (h, i) not in parts]
    if missing:
        return None, [f"{requester} holds no trained {', '.join(missing)}"]
    model = assemble_model(cfg, parts)
    return {"format": FORMAT, "config": cfg.agreed(), "state_dict": model.state_dict(), "requester": requester,
            "holders": [[h, i] for h, i in wanted], "exported_at": time.time()}, []


def refusal(cfg: JobConfig, requester: str, problems: list[str]) -> str:
    """One message: who has not approved (named), and what they can run on their side."""
    return (f"export refused: the whole model of job {cfg.job_id} is assembled only when every segment holder "
            "has approved it; " + "; ".join(problems))


def export_segment(module: nn.Module, example: torch.Tensor, path: Path, fmt: str) -> Path:
    """One segment alone, for deployment: ``torch.export`` (.pt2), TorchScript (.pt) or ONNX (.onnx).

    Raises:
        ConfigError: ONNX asked for without the ``onnx`` package installed.
    """
    module = module.eval()
    if fmt == "onnx":
        if importlib.util.find_spec("onnx") is None:
            raise ConfigError("--format onnx needs the onnx package (pip install onnx); or use --format export")
        out = path.with_suffix(".onnx")
        torch.onnx.export(module, (example,), str(out), input_names=["x"], dynamic_axes={"x": {0: "batch"}})
        return out
    if fmt == "torchscript":
        out = path.with_suffix(".pt")
        torch.jit.save(torch.jit.trace(module, example), str(out))  # type: ignore[no-untyped-call]
        return out
    out = path.with_suffix(".pt2")
    program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(out))
    return out


def example_inputs(cfg: JobConfig, party: int = 0) -> list[torch.Tensor]:
    """A two-sample input of every segment, from the job's data run through fresh segments."""
    samples = assemble.owner_data(cfg, party)
    x = samples.train.batch(torch.arange(2)).x
    assert isinstance(x, torch.Tensor)
    out = [x]
    with torch.no_grad():
        if cfg.vertical_parts:
            vertical = unsplit(cfg)
            assert isinstance(vertical, local.VerticalChain)
            width = sum(b(assemble.owner_data(cfg, i).train.batch(torch.arange(2)).x).shape[1]
                        for i, b in enumerate(vertical.bottoms))
            return [x, torch.zeros(2, width)]
        chain = unsplit(cfg)
        assert isinstance(chain, local.Chain)
        for seg in list(chain.segments)[:-1]:
            out.append(seg(out[-1]))
    return out


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from splitmq.workers import options
    p = sub.add_parser("export", help="assemble the whole trained model (with every holder's consent), "
                                      "or export this party's own segments alone",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    options.add_job_options(p)
    options.add_connection_options(p)
    g = p.add_argument_group("export")
    g.add_argument("--as", dest="requester", required=True, help="this party's name (a data owner or a stage)")
    g.add_argument("--owner", default="", help="whose bottom (and U-shaped head) to take (default: --as if it is "
                                               "a data owner, else client-0)")
    g.add_argument("--out", required=True, help="the model file (whole model) or a directory (--segment-only)")
    g.add_argument("--run-dir", help="this party's run directory: its kept segments (default runs/<job>)")
    g.add_argument("--checkpoint-dir", help="take this party's segments from its checkpoint instead")
    g.add_argument("--segment-only", action="store_true", help="export only this party's own segments, alone")
    g.add_argument("--format", choices=FORMATS, default="export", help="--segment-only: the file format")
    g.add_argument("--timeout", type=float, default=defaults.EXPORT_TIMEOUT_S, help="seconds to wait for holders")
    p.set_defaults(func=main, needs_torch=True)


def main(args: argparse.Namespace) -> int:
    from splitmq.workers import options
    cfg = options.job_config(args)
    me = topology.check_name("client", args.requester)
    run_dir = args.run_dir or f"runs/{cfg.job_id}"
    if args.segment_only:
        held = segments.held(cfg, me, run_dir=run_dir, checkpoint_dir=args.checkpoint_dir)
        index = topology.client_index(me) or 0
        examples = example_inputs(cfg, index if cfg.vertical_parts else 0)
        for i, state in sorted(held.items()):
            module = assemble.segment(cfg, i, party=index if cfg.vertical_parts else 0)
            module.load_state_dict(state)
            out = export_segment(module, examples[i], Path(args.out) / f"segment-{i}-{me}", args.format)
            print(f"{me}: segment {i} -> {out}")
        return 0
    owner = args.owner or (me if me not in cfg.stages else topology.client_name(0))
    content, problems = request(cfg, requester=me, owner=owner, amqp_url=args.amqp_url, run_dir=run_dir,
                                checkpoint_dir=args.checkpoint_dir, timeout_s=args.timeout,
                                tls=options.tls_options(args))
    if content is None:
        print(f"splitmq export: {refusal(cfg, me, problems)}", file=sys.stderr)
        return 1
    checkpoint.save(args.out, content)
    print(f"{me}: the whole model of job {cfg.job_id} ({len(content['holders'])} segments, every holder approved) "
          f"-> {args.out}")
    return 0
