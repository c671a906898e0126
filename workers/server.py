"""``splitmq server``: a party holding a stage after the bottom: the top (with the loss) or a middle hop.

Thin by design: parse options, choose this stage's roles once, run the party loop. The
stage is one of the job's ``stages`` (``--stage``, default the first); its place in the
chain decides its roles: the last stage is the top (or the vertical top), any other a
relay; the first also keeps the owners' bottom sync. Every stage has a join desk.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from splitmq.shared import checkpoint, data, defaults, topology, validate
from splitmq.shared.broker import Broker
from splitmq.shared.config import OWNER_HEAD, BottomSync, JobConfig
from splitmq.shared.metrics import Metrics
from splitmq.shared.stage import Stage
from splitmq.workers import assemble, gate, options
from splitmq.workers.party import LoopOptions, Party
from splitmq.workers.roles.base import Role
from splitmq.workers.roles.members import JoinDesk, Members
from splitmq.workers.roles.relay import RelayRole
from splitmq.workers.roles.sync import SyncDesk
from splitmq.workers.roles.top import TopRole
from splitmq.workers.roles.vertical import VerticalTopRole
from splitmq.workers.stats import Stats


@dataclass(frozen=True)
class ServerOptions:
    stage: str = ""                      # "" = the job's first stage
    device: str = "cpu"
    checkpoint_dir: str | None = None
    run_dir: str | None = None
    require_identity: bool = False
    serve_forever: bool = False
    idle_timeout_s: float = defaults.IDLE_TIMEOUT_S
    sync_timeout_s: float = defaults.SYNC_TIMEOUT_S
    vertical_timeout_s: float = defaults.VERTICAL_TIMEOUT_S
    private_outputs: bool = False
    data: data.Data | None = None        # this party's own samples (labels kept at the top), given in-process


def build(cfg: JobConfig, opts: ServerOptions, stats: Stats) -> tuple[list[Role], LoopOptions]:
    """This stage's roles and loop options.

    Raises:
        ConfigError / ValueError: a stage that is not in the job's chain.
    """
    stage_name = opts.stage or cfg.stages[0]
    if stage_name not in cfg.stages or stage_name == OWNER_HEAD:
        raise ValueError(f"--stage {stage_name!r} is not a stage this server can hold; the job's stages are "
                         f"{list(cfg.stages)} (set stages in the job config)")
    position = cfg.stages.index(stage_name) + 1
    last = position == len(cfg.stages)
    job = cfg.job_id
    forward_queue = topology.forward_queue(job, stage_name)
    members = Members(num_clients=cfg.vertical_parts or cfg.num_clients, epochs=cfg.epochs, spec=cfg.agreed(),
                      compare_bottoms=cfg.bottom_sync is not BottomSync.INDEPENDENT and cfg.num_clients > 1,
                      compare_models=not cfg.vertical_parts)
    stage = assemble.server_stage(cfg, position, last=last, total_steps=members.total_batches, device=opts.device)
    if not cfg.vertical_parts:
        members.accepts = assemble.accepts_cut(stage)
    limits = _limits(cfg, members)
    roles: list[Role]
    nxt: Callable[[str], str] | None = None
    if cfg.vertical_parts:
        labels = assemble.top_labels(cfg, own=opts.data)
        serving: Role = VerticalTopRole(stage, members=members, stats=stats, job_id=job, forward_queue=forward_queue,
                                        parties=cfg.vertical_parts, combine=cfg.combine, labels=labels,
                                        task=cfg.task.value, batch_size=cfg.batch_size,
                                        timeout_s=opts.vertical_timeout_s)
    elif last:
        serving = TopRole(stage, members=members, stats=stats, job_id=job, forward_queue=forward_queue, limits=limits,
                          labels=assemble.top_labels(cfg, own=opts.data), task=cfg.task.value,
                          private=opts.private_outputs)
    else:
        following = cfg.stages[position]
        nxt = topology.head_stage if following == OWNER_HEAD else (lambda _client: following)
        serving = RelayRole(stage, members=members, stats=stats, job_id=job, me=stage_name,
                            forward_queue=forward_queue, reply_queue=topology.reply_queue(job, stage_name),
                            next_stage=nxt, limits=limits)
    assert serving.ledger is not None
    desk = JoinDesk(members, serving.ledger, stage=stage_name, job_id=job, forward_queue=forward_queue,
                    reply_queue=None if last else topology.reply_queue(job, stage_name), next_stage=nxt,
                    serve_forever=opts.serve_forever, idle_timeout_s=opts.idle_timeout_s,
                    onward_spec=None if last else _onward_spec(stage))
    roles = [desk, serving]
    if position == 1 and not cfg.vertical_parts:
        roles.append(SyncDesk(members, mode=cfg.bottom_sync, job_id=job, forward_queue=forward_queue,
                              timeout_s=opts.sync_timeout_s, stats=stats))
    following_queue = () if last or cfg.stages[position] == OWNER_HEAD else (cfg.stages[position],)
    layout = topology.job_layout(job, stages=(stage_name, *following_queue), parties=() if last else (stage_name,))
    upstream = frozenset({cfg.stages[position - 2]}) if position > 1 else frozenset()
    loop = LoopOptions(name=stage_name, job_id=job, spec=cfg.agreed(), primary=serving.name,
                       checkpoint_path=checkpoint.path_for(opts.checkpoint_dir, stage_name) if opts.checkpoint_dir
                       else None, checkpoint_every=cfg.checkpoint_every,
                       rules=gate.GateRules(job_id=job, require_identity=opts.require_identity, upstream=upstream),
                       layout=layout)
    return roles, loop


def _limits(cfg: JobConfig, members: Members) -> Callable[[], validate.Limits | None]:
    """The forward limits of this stage, known once the first owner has joined (its cut shape)."""
    cache: dict[tuple[int, ...], validate.Limits] = {}

    def limits() -> validate.Limits | None:
        shape = tuple(members.model.get("cut_shape") or ())
        if not shape:
            return None
        if shape not in cache:
            cache[shape] = validate.Limits(cfg.job_id, shape, cfg.batch_size)
        return cache[shape]
    return limits


def _onward_spec(stage: Stage) -> Callable[[dict[str, object]], dict[str, object]]:
    """What a middle hop tells the next stage: the owner's spec with this stage's output shape as the cut."""
    def onward(spec: dict[str, object]) -> dict[str, object]:
        shape = spec.get("cut_shape")
        if not isinstance(shape, list):
            return spec
        out = stage.infer(torch.zeros(2, *shape))
        return {**spec, "cut_shape": list(out.shape[1:])}
    return onward


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("server", help="serve a stage after the bottom: the top with the loss, or a middle hop",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    options.add_job_options(p)
    options.add_connection_options(p)
    options.add_party_options(p)
    g = p.add_argument_group("server")
    g.add_argument("--stage", default="", help="which of the job's stages this server holds (default: the first)")
    g.add_argument("--serve-forever", action="store_true",
                   help="keep serving after every data owner has finished (default: exit 0 with a summary)")
    g.add_argument("--idle-timeout", type=float, default=defaults.IDLE_TIMEOUT_S,
                   help="exit (code 75) after this many seconds without a message while owners are unfinished")
    g.add_argument("--sync-timeout", type=float, default=defaults.SYNC_TIMEOUT_S,
                   help="bottom averaging: close a round without the owners still absent after this many seconds")
    g.add_argument("--vertical-timeout", type=float, default=defaults.VERTICAL_TIMEOUT_S,
                   help="vertical split: seconds to wait for a batch's missing parts before skipping it")
    g.add_argument("--private-outputs", action="store_true", help="never send loss or metrics back to the owners")
    g.add_argument("--require-identity", action="store_true",
                   help="accept only messages whose broker-validated user_id names their sender")
    g.add_argument("--prefetch", type=int, default=256, help="unacked deliveries the broker may send ahead")
    p.set_defaults(func=main, needs_torch=True)


def main(args: argparse.Namespace) -> int:
    from splitmq.workers import cli
    cfg = options.job_config(args)
    assemble.configure_torch(args.torch_threads, args.device)
    stage_name = args.stage or cfg.stages[0]
    stats = Stats(Metrics("trainer" if stage_name == cfg.stages[-1] else "stage"),
                  history_path=Path(args.run_dir or f"runs/{cfg.job_id}") / f"history-{stage_name}.jsonl",
                  party=stage_name)
    opts = ServerOptions(stage=stage_name, device=args.device, checkpoint_dir=args.checkpoint_dir,
                         require_identity=args.require_identity, serve_forever=args.serve_forever,
                         idle_timeout_s=args.idle_timeout, sync_timeout_s=args.sync_timeout,
                         vertical_timeout_s=args.vertical_timeout, private_outputs=args.private_outputs)
    roles, loop = build(cfg, opts, stats)
    loop = LoopOptions(**{**vars(loop), "broker_timeout_s": args.broker_timeout, "lease_timeout_s": args.lease_timeout,
                          "user_id": None})
    transport = Broker(args.amqp_url, name=stage_name, prefetch=args.prefetch, tls=options.tls_options(args),
                       lease=topology.lease_queue(cfg.job_id, stage_name), on_reconnect=stats.reconnected)
    return cli.finish(Party(roles, transport, loop, stats=stats, stop=cli.STOP), args)
