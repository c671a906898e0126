"""``splitmq worker``: a data owner running the bottom segment (and, U-shaped, its own head).

Thin by design: parse options, build the owner's data and segment, choose its roles once,
run the party loop. Its name is ``--client-id`` (default ``client-<index>``); a conventional
name and ``--client-index`` must agree.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from splitmq.shared import checkpoint, data, defaults, schedule, topology
from splitmq.shared.broker import Broker
from splitmq.shared.config import Align, Delivery, JobConfig, LabelSource
from splitmq.shared.errors import ConfigError
from splitmq.shared.ledger import Ledger
from splitmq.shared.metrics import Metrics
from splitmq.shared.stage import Stage
from splitmq.workers import assemble, gate, options, runtime, segments
from splitmq.workers.party import LoopOptions, Party
from splitmq.workers.roles.align import AlignAnswer
from splitmq.workers.roles.base import Role
from splitmq.workers.roles.bottom import BottomRole
from splitmq.workers.roles.members import JoinDesk, Members
from splitmq.workers.roles.owner_waits import OwnerTimeouts
from splitmq.workers.roles.sync import owner_policy
from splitmq.workers.roles.top import TopRole
from splitmq.workers.stats import Stats


@dataclass(frozen=True)
class WorkerOptions:
    client_id: str = ""              # "" = client-<index>
    client_index: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None
    evaluate: bool = True
    timeouts: OwnerTimeouts = OwnerTimeouts()
    data: data.Data | None = None    # the owner's samples, given in-process (else the job's `data` setting)
    run_dir: str | None = None       # where the trained segments are kept at exit (None: not kept)


def identity(client_id: str, index: int, cfg: JobConfig) -> tuple[str, int]:
    """This owner's name and index, checked against each other and the job.

    Raises:
        ConfigError: a conventional name whose number is not the index, or an index out of range.
    """
    owners = cfg.vertical_parts or cfg.num_clients
    name = client_id or topology.client_name(index)
    try:
        topology.check_name("client", name)
    except ValueError as exc:
        raise ConfigError(f"--client-id: {exc}") from None
    conventional = topology.client_index(name)
    if conventional is not None and conventional != index:
        raise ConfigError(f"--client-id {name} is owner {conventional}, but --client-index is {index}: "
                          "give one of them, or make them agree")
    if not 0 <= index < owners:
        raise ConfigError(f"--client-index {index} is out of range: the job has {owners} data owner(s) "
                          f"(0..{owners - 1}); set --num-clients")
    return name, index


def build(cfg: JobConfig, opts: WorkerOptions, stats: Stats) -> tuple[list[Role], LoopOptions]:
    """This owner's roles and loop options."""
    me, index = identity(opts.client_id, opts.client_index, cfg)
    samples = opts.data if opts.data is not None else assemble.owner_data(cfg, index)
    stage = assemble.bottom_stage(cfg, index, len(samples.train), opts.device, probe=assemble.probe(samples),
                                  report=lambda dcor: stats.gauge("dcor", dcor))
    spec = assemble.owner_spec(cfg, stage, samples)
    job, dest = cfg.job_id, topology.owner_stage(cfg.stages[0], index, cfg.shards)  # its trainer's shard, if any
    ledger = Ledger()
    roles: list[Role] = []
    head: TopRole | None = None
    queues = [dest]
    if cfg.u_shaped:  # our own head: the last segment, with the loss and the labels, stays here
        head_name = topology.head_stage(me)
        head_members = Members(num_clients=cfg.num_clients, epochs=cfg.epochs, spec=cfg.agreed(), compare_bottoms=False)
        head_stage = assemble.server_stage(cfg, cfg.segment_count - 1, last=True,
                                           total_steps=lambda: cfg.epochs * -(-len(samples.train) // cfg.batch_size),
                                           device=opts.device)
        head_members.accepts = assemble.accepts_cut(head_stage)
        forward = topology.forward_queue(job, head_name)
        head = TopRole(head_stage, members=head_members, stats=stats, job_id=job, forward_queue=forward,
                       limits=lambda: None, labels=assemble.top_labels(cfg, own=samples), task=cfg.task.value,
                       private=True, own_head=True, protection=assemble.label_protection(cfg))
        head.name = "head"
        roles.append(JoinDesk(head_members, head.ledger or Ledger(), stage=head_name, job_id=job,
                              forward_queue=forward, serve_forever=True))
        roles.append(head)
        queues.append(head_name)
    sync = owner_policy(cfg.bottom_sync, num_clients=cfg.num_clients, index=index, sync_every=cfg.sync_every)
    psi = cfg.align is Align.PSI
    bottom = BottomRole(stage, cfg=cfg, me=me, index=index, samples=samples, dest=dest,
                        reply_queue=topology.reply_queue(job, me), ledger=ledger, stats=stats, spec=spec, sync=sync,
                        evaluate=opts.evaluate, send_labels=cfg.label_source is LabelSource.BATCH and not cfg.u_shaped,
                        order_seed=cfg.seed if cfg.vertical_parts else cfg.seed + index, timeouts=_timeouts(cfg, opts),
                        local_scores=(lambda: head.last_scores) if head is not None else None, aligned=not psi)
    stage.schedule = schedule.make(cfg.lr_schedule.value, lambda: bottom.total)  # known once aligned
    roles.insert(0, bottom)
    if psi:
        roles.append(AlignAnswer(samples, me=me, job_id=job, reply_queue=topology.reply_queue(job, me), dest=dest,
                                 adopt=bottom.align))
    upstream = frozenset({cfg.stages[-2]}) if cfg.u_shaped else frozenset()
    loop = LoopOptions(name=me, job_id=job, spec={**cfg.agreed(), "client_id": me}, primary="bottom",
                       checkpoint_path=checkpoint.path_for(opts.checkpoint_dir, me) if opts.checkpoint_dir else None,
                       checkpoint_every=cfg.checkpoint_every, rules=gate.GateRules(job_id=job, upstream=upstream),
                       layout=topology.with_delivery(topology.with_replicas(
                           topology.job_layout(job, stages=tuple(queues), parties=(me,)), cfg.replicas),
                           cfg.delivery.value),
                       on_exit=_keeper(cfg, me, opts.run_dir, stage, head))
    return roles, loop


def _timeouts(cfg: JobConfig, opts: WorkerOptions) -> OwnerTimeouts:
    """A transient job's broker may lose a batch or its answer: an unanswered batch goes again soon."""
    if cfg.delivery is not Delivery.TRANSIENT:
        return opts.timeouts
    return dataclasses.replace(opts.timeouts, resend_after_s=min(opts.timeouts.resend_after_s,
                                                                 defaults.TRANSIENT_RESEND_AFTER_S))


def _keeper(cfg: JobConfig, me: str, run_dir: str | None, bottom: Stage, head: TopRole | None) -> Any:
    """Keep this owner's trained bottom (and head) in its run directory when it exits."""
    if run_dir is None:
        return None
    held = {0: bottom, **({cfg.segment_count - 1: head.stage} if head is not None else {})}
    return segments.keeper(segments.path_for(run_dir, me), cfg, me, held)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("worker", help="run a data owner's bottom segment",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    options.add_job_options(p)
    options.add_connection_options(p)
    options.add_party_options(p)
    g = p.add_argument_group("data owner")
    g.add_argument("--client-id", default="", help="this owner's name (default client-<index>)")
    g.add_argument("--client-index", type=int, default=None, help="which owner of the job this is (0-based)")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation after each epoch")
    g.add_argument("--join-timeout", type=float, default=defaults.JOIN_TIMEOUT_S,
                   help="seconds to wait for the trainer's answer at start")
    g.add_argument("--peer-timeout", type=float, default=defaults.PEER_TIMEOUT_S,
                   help="seconds to wait for the answer to any one batch or request before exiting (code 75)")
    g.add_argument("--pushgateway", help="push metrics to this Prometheus Pushgateway (edge devices behind NAT)")
    p.set_defaults(func=main, needs_torch=True)


def main(args: argparse.Namespace) -> int:
    from splitmq.workers import cli
    cfg = options.job_config(args)
    index = args.client_index if args.client_index is not None else (topology.client_index(args.client_id) or 0)
    me, index = identity(args.client_id, index, cfg)
    assemble.configure_process(args.torch_threads, args.device)
    metrics = Metrics("worker", job_id=cfg.job_id)
    stats = Stats(metrics, history_path=runtime.history_path(args.run_dir, cfg.job_id, me), party=me)
    timeouts = OwnerTimeouts(peer_s=args.peer_timeout, join_s=args.join_timeout)
    opts = WorkerOptions(client_id=me, client_index=index, device=args.device, checkpoint_dir=args.checkpoint_dir,
                         evaluate=not args.no_eval, timeouts=timeouts, run_dir=args.run_dir or f"runs/{cfg.job_id}")
    roles, loop = build(cfg, opts, stats)
    loop = LoopOptions(**{**vars(loop), "broker_timeout_s": args.broker_timeout, "lease_timeout_s": args.lease_timeout,
                          "user_id": runtime.broker_username(args.amqp_url)})
    transport = Broker(args.amqp_url, name=me, tls=options.tls_options(args), lease=topology.lease_queue(cfg.job_id, me),
                       prefetch=cfg.checkpoint_every + cfg.max_in_flight + 64, on_reconnect=stats.reconnected)
    stop_pushing = None
    if args.pushgateway:
        from splitmq.shared.push import start_pushing
        stop_pushing = start_pushing(args.pushgateway, job="splitmq-worker", instance=me, registry=metrics.registry,
                                     interval_s=5.0)
    try:
        return cli.finish(Party(roles, transport, loop, stats=stats, stop=cli.STOP), args)
    finally:
        if stop_pushing:
            stop_pushing()
