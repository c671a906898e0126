"""Which serving roles a server hosts (``splitmq server --serve``), chosen once at start.

The serving roles share the training role's ``Stage``: during training they answer with the
live weights (between training messages: one loop, one thread); after training, a server
started with ``--serve-forever`` answers with the trained weights, from its checkpoint or,
without one, from the segments its run directory kept (``workers.segments``). Every server
that serves also answers export requests, with its holder's consent (``roles.export``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from splitmq.shared import topology
from splitmq.shared.config import OWNER_HEAD, JobConfig
from splitmq.shared.stage import Stage
from splitmq.workers import consent, segments
from splitmq.workers.roles.base import Role
from splitmq.workers.roles.export import ExportRole
from splitmq.workers.roles.members import Members
from splitmq.workers.roles.serving import ServeRole, VerticalServeRole
from splitmq.workers.stats import Stats


def server_roles(cfg: JobConfig, stage: Stage, *, name: str, position: int, members: Members, stats: Stats,
                 run_dir: str | None, vertical_timeout_s: float, checkpointed: bool) -> list[Role]:
    """The serving and export roles of stage ``name`` (segment ``position`` of the chain)."""
    if not checkpointed:
        segments.adopt(stage, position, cfg, name, run_dir)
    serving: Role
    if cfg.vertical_parts:
        serving = VerticalServeRole(stage, job_id=cfg.job_id, address=name, parties=cfg.vertical_parts,
                                    combine=cfg.combine, party_name=_party_name(members),
                                    index_of=_index_of(members), stats=stats, timeout_s=vertical_timeout_s)
    elif position == len(cfg.stages):
        serving = ServeRole(stage, job_id=cfg.job_id, address=name, stats=stats)
    else:
        following = cfg.stages[position]
        nxt: Callable[[str], str] = topology.head_stage if following == OWNER_HEAD else (lambda _c: following)
        serving = ServeRole(stage, job_id=cfg.job_id, address=name, stats=stats, next_stage=nxt,
                            next_answers=following != OWNER_HEAD)
    where = Path(run_dir or f"runs/{cfg.job_id}")
    export = ExportRole(job_id=cfg.job_id, me=name, segments={position: stage.segment},
                        consent_path=consent.path_for(where, name))
    return [serving, export]


def _party_name(members: Members) -> Callable[[int], str]:
    """A vertical party's name: as it joined, else the conventional ``client-<i>``."""
    def name(index: int) -> str:
        member = members.by_index(index)
        return member.name if member is not None else topology.client_name(index)
    return name


def _index_of(members: Members) -> Callable[[str], int | None]:
    def index(name: str) -> int | None:
        member = members.by_name.get(name)
        return member.index if member is not None else topology.client_index(name)
    return index
