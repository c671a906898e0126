"""``splitmq server``: a party holding a stage after the bottom: the top (with the loss) or a middle hop.

Thin by design: parse options, choose this stage's roles once, run the party loop. The
stage is one of the job's ``stages`` (``--stage``, default the first); its place in the
chain decides its roles: the last stage is the top (or the vertical top), any other a
relay; the first also keeps the owners' bottom sync. Every stage has a join desk.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch

from splitmq.shared import checkpoint, data, defaults, topology, validate
from splitmq.shared.broker import Broker
from splitmq.shared.errors import ConfigError
from splitmq.shared.config import OWNER_HEAD, Align, BottomSync, JobConfig, LabelSource
from splitmq.shared.metrics import Metrics
from splitmq.shared.stage import Stage
from splitmq.workers import assemble, gate, options, runtime, segments, serve
from splitmq.workers.party import LoopOptions, Party
from splitmq.workers.roles.align import AlignDesk
from splitmq.workers.roles.base import Role
from splitmq.workers.roles.members import JoinDesk, Members
from splitmq.workers.roles.relay import RelayRole
from splitmq.workers.roles.replicas import Replicas
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
    serve: bool = False                  # also answer predictions and export requests (implied by serve_forever)
    shard: int | None = None             # which trainer of a sharded job this is (shards > 1)
    standby: bool = False                # wait while another trainer of this stage runs, then take over


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
    stage_name = party_name(cfg, stage_name, opts.shard)  # a sharded job: this trainer's shard (top-s1)
    job = cfg.job_id
    forward_queue = topology.forward_queue(job, stage_name)
    members = Members(num_clients=cfg.vertical_parts or cfg.num_clients, epochs=cfg.epochs, spec=cfg.agreed(),
                      compare_bottoms=cfg.bottom_sync is not BottomSync.INDEPENDENT and cfg.num_clients > 1,
                      compare_models=not cfg.vertical_parts,
                      expected=topology.shard_owners(opts.shard or 0, cfg.shards, cfg.num_clients)
                      if cfg.shards > 1 else None)
    own = opts.data if opts.data is not None or cfg.label_source is not LabelSource.TOP else assemble.own_data(cfg)
    align: AlignDesk | None = None
    if cfg.align is Align.PSI and own is not None:  # the label holder finds the samples every party holds
        align = AlignDesk(members, own, job_id=cfg.job_id,
                          forward_queue=topology.forward_queue(cfg.job_id, stage_name), parties=cfg.vertical_parts)
    stage = assemble.server_stage(cfg, position, last=last, total_steps=_total_steps(cfg, members, align),
                                  device=opts.device)
    if not cfg.vertical_parts:
        members.accepts = assemble.accepts_cut(stage)
    limits = _limits(cfg, members)
    roles: list[Role]
    nxt: Callable[[str], str] | None = None
    if cfg.vertical_parts:
        labels = assemble.top_labels(cfg, own=own)
        serving: Role = VerticalTopRole(stage, members=members, stats=stats, job_id=job, forward_queue=forward_queue,
                                        parties=cfg.vertical_parts, combine=cfg.combine, labels=labels,
                                        task=cfg.task.value, batch_size=cfg.batch_size,
                                        timeout_s=opts.vertical_timeout_s)
    elif last:
        serving = TopRole(stage, members=members, stats=stats, job_id=job, forward_queue=forward_queue, limits=limits,
                          labels=assemble.top_labels(cfg, own=own), task=cfg.task.value,
                          private=opts.private_outputs, protection=assemble.label_protection(cfg))
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
    roles = [desk, serving] + ([align] if align is not None else [])
    if position == 1 and not cfg.vertical_parts:
        roles += _sync_roles(cfg, opts, members, stage, stage_name, stats)
    if opts.serve or opts.serve_forever:
        roles += serve.server_roles(cfg, stage, name=stage_name, position=position, members=members, stats=stats,
                                    run_dir=opts.run_dir, vertical_timeout_s=opts.vertical_timeout_s,
                                    checkpointed=opts.checkpoint_dir is not None)
    following_queue = () if last or cfg.stages[position] == OWNER_HEAD else (cfg.stages[position],)
    layout = topology.job_layout(job, stages=(stage_name, *following_queue),
                                 parties=_reply_queues(cfg, stage_name, last),
                                 serving=(stage_name,) if opts.serve or opts.serve_forever else ())
    layout = topology.with_delivery(topology.with_replicas(layout, cfg.replicas), cfg.delivery.value)
    upstream = frozenset({cfg.stages[position - 2]}) if position > 1 else frozenset()
    loop = LoopOptions(name=stage_name, job_id=job, spec=cfg.agreed(), primary=serving.name,
                       standby=opts.standby, in_use_hint=_in_use_hint(cfg, stage_name),
                       checkpoint_path=checkpoint.path_for(opts.checkpoint_dir, stage_name) if opts.checkpoint_dir
                       else None, checkpoint_every=cfg.checkpoint_every,
                       rules=gate.GateRules(job_id=job, require_identity=opts.require_identity, upstream=upstream),
                       layout=layout, on_exit=segments.keeper(segments.path_for(opts.run_dir, stage_name), cfg,
                                                               stage_name, {position: stage}) if opts.run_dir else None)
    return roles, loop


def party_name(cfg: JobConfig, stage: str, shard: int | None) -> str:
    """The name a server of ``stage`` runs under: the stage, or, in a sharded job, its shard (``top-s1``).

    Raises:
        ValueError: a shard missing or out of range, or given for a job that is not sharded.
    """
    if cfg.shards == 1:
        if shard not in (None, 0):
            raise ValueError(f"--shard {shard}: job {cfg.job_id!r} has one trainer (set shards to share its owners)")
        return stage
    if shard is None or not 0 <= shard < cfg.shards:
        raise ValueError(f"job {cfg.job_id!r} has {cfg.shards} trainers (shards): give this one --shard "
                         f"0..{cfg.shards - 1}" + (f", not {shard}" if shard is not None else ""))
    return topology.shard_stage(stage, shard)


def _sync_roles(cfg: JobConfig, opts: ServerOptions, members: Members, stage: Stage, me: str,
                stats: Stats) -> list[Role]:
    """The first stage's bottom sync; in a sharded job, with the averaging between the trainers."""
    desk = SyncDesk(members, mode=cfg.bottom_sync, job_id=cfg.job_id,
                    forward_queue=topology.forward_queue(cfg.job_id, me), timeout_s=opts.sync_timeout_s, stats=stats)
    if cfg.shards == 1:
        return [desk]
    replicas = Replicas(stage, desk.rounds, me=me, trainers=topology.shard_stages(cfg.stages[0], cfg.shards),
                        job_id=cfg.job_id, reply_queue=topology.reply_queue(cfg.job_id, me),
                        timeout_s=opts.sync_timeout_s)
    desk.round_end = replicas
    return [desk, replicas]


def _reply_queues(cfg: JobConfig, me: str, last: bool) -> tuple[str, ...]:
    """Whose reply queues this server declares: a middle hop's own; in a sharded job every trainer's
    (the parts of each round's average wait there for a trainer that is away)."""
    if cfg.shards > 1:
        return topology.shard_stages(cfg.stages[0], cfg.shards)
    return () if last else (me,)


def _in_use_hint(cfg: JobConfig, me: str) -> str:
    """What to do when another server holds this one's name: the two ways to run several trainers."""
    return (f"another trainer serves {me!r} of job {cfg.job_id!r}. To run several trainers, start this one with "
            "--standby (it waits, and takes over from the shared --checkpoint-dir when that one stops), or shard "
            "the job (shards = T in the job config, each trainer with its own --shard 0..T-1) to share the data "
            "owners between them")


def _total_steps(cfg: JobConfig, members: Members, align: AlignDesk | None) -> Callable[[], int]:
    """How many updates this stage makes over the job (its learning-rate schedule's length)."""
    if align is not None:
        return lambda: cfg.epochs * data.batches_per_epoch(max(1, align.train_count), cfg.batch_size)
    if cfg.vertical_parts:  # every party sends a part of the same batches
        return lambda: cfg.epochs * max([m.batches_per_epoch for m in members.by_name.values()] or [1])
    return members.total_batches


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
    g.add_argument("--serve", action="store_true",
                   help="also answer predictions (splitmq predict) and export requests, during training")
    g.add_argument("--serve-forever", action="store_true",
                   help="keep serving (predictions, exports) after every data owner has finished "
                        "(default: exit 0 with a summary)")
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
    g.add_argument("--shard", type=int, default=None,
                   help="which trainer of a sharded job this is (0..shards-1): it serves owners i with i mod shards "
                        "= SHARD, and averages its top with the other trainers every round (docs/scaling.md)")
    g.add_argument("--standby", action="store_true",
                   help="wait, without a deadline, while another trainer of this stage (and shard) runs; take over "
                        "from the shared --checkpoint-dir when it stops (docs/scaling.md)")
    p.set_defaults(func=main, needs_torch=True)


def main(args: argparse.Namespace) -> int:
    from splitmq.workers import cli
    cfg = options.job_config(args)
    assemble.configure_process(args.torch_threads, args.device)
    stage_name = args.stage or cfg.stages[0]
    if args.standby and not args.checkpoint_dir:
        raise ConfigError("--standby needs --checkpoint-dir (the active trainer's, on storage both reach): "
                          "without it a standby would take over with a fresh top")
    me = party_name(cfg, stage_name, args.shard)
    stats = Stats(Metrics("trainer" if stage_name == cfg.stages[-1] else "stage", job_id=cfg.job_id),
                  history_path=runtime.history_path(args.run_dir, cfg.job_id, me), party=me)
    opts = ServerOptions(stage=stage_name, device=args.device, checkpoint_dir=args.checkpoint_dir,
                         shard=args.shard, standby=args.standby,
                         require_identity=args.require_identity, serve_forever=args.serve_forever,
                         serve=args.serve, run_dir=args.run_dir or f"runs/{cfg.job_id}",
                         idle_timeout_s=args.idle_timeout, sync_timeout_s=args.sync_timeout,
                         vertical_timeout_s=args.vertical_timeout, private_outputs=args.private_outputs)
    roles, loop = build(cfg, opts, stats)
    loop = LoopOptions(**{**vars(loop), "broker_timeout_s": args.broker_timeout, "lease_timeout_s": args.lease_timeout,
                          "user_id": None})
    transport = Broker(args.amqp_url, name=loop.name, prefetch=args.prefetch, tls=options.tls_options(args),
                       lease=topology.lease_queue(cfg.job_id, loop.name), on_reconnect=stats.reconnected)
    return cli.finish(Party(roles, transport, loop, stats=stats, stop=cli.STOP), args)
