"""The trained segments a party keeps: written at the end of training, read to serve and export.

Every party that trained writes ``<run-dir>/segments-<party>.pt`` when it exits, with or
without ``--checkpoint-dir``: one ``torch.save`` of plain values (the job's agreed config,
the party, how it ended, and each segment it holds by its index in the chain: 0 = the
bottom, the last = the top or a U-shaped owner's head). It loads with ``weights_only=True``.
A party that applied no update leaves an existing file alone (a serving-only restart must
not overwrite trained weights with fresh ones). A checkpoint holds the same weights.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from splitmq.shared import checkpoint
from splitmq.shared.config import OWNER_HEAD, JobConfig, differences
from splitmq.shared.errors import ConfigError
from splitmq.shared.stage import Stage
from splitmq.workers.exits import ExitReason

log = logging.getLogger(__name__)


def path_for(run_dir: str | Path, party: str) -> Path:
    return Path(run_dir) / f"segments-{party}.pt"


def keeper(path: Path, cfg: JobConfig, party: str, stages: dict[int, Stage]) -> Callable[[ExitReason], None]:
    """What a party calls when it exits: save the segments it holds (if it trained them at all)."""
    def keep(reason: ExitReason) -> None:
        if not any(s.version for s in stages.values()):
            return
        checkpoint.save(path, {"config": cfg.agreed(), "party": party, "exit": reason.value,
                               "segments": {i: {"state_dict": s.segment.state_dict(), "version": s.version}
                                            for i, s in stages.items()}})
        log.info("%s: kept its trained segment(s) %s in %s", party, sorted(stages), path)
    return keep


def index_of_role(cfg: JobConfig, party: str, role: str) -> int | None:
    """The chain index of the segment a checkpointed role holds (None: it holds none)."""
    last = 1 if cfg.vertical_parts else cfg.segment_count - 1
    if role == "bottom":
        return 0
    if role == "head":
        return last
    if role in ("top", "relay"):
        servers = [s for s in cfg.stages if s != OWNER_HEAD]
        return 1 if cfg.vertical_parts else (servers.index(party) + 1 if party in servers else None)
    return None


def held(cfg: JobConfig, party: str, *, run_dir: str | Path | None,
         checkpoint_dir: str | Path | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """The trained segments ``party`` holds, by chain index: from its checkpoint, else its run directory.

    Raises:
        ConfigError: none found, or they were trained for another job (the differences listed).
    """
    if checkpoint_dir:
        state = checkpoint.load(checkpoint.path_for(checkpoint_dir, party))
        if state is not None:
            _same_job(cfg, state["config"], f"checkpoint of {party} in {checkpoint_dir}")
            out = {}
            for role, saved in state["roles"].items():
                index = index_of_role(cfg, party, role)
                stage = saved.get("role", {}).get("stage") if isinstance(saved, dict) else None
                if index is not None and stage:
                    out[index] = stage["segment"]
            if out:
                return out
    path = path_for(run_dir, party) if run_dir else None
    saved = checkpoint.load(path) if path is not None else None
    if saved is None:
        raise ConfigError(f"no trained segments of {party}: neither {path} nor a checkpoint in --checkpoint-dir "
                          f"{checkpoint_dir}; train first, or point --run-dir / --checkpoint-dir at them")
    _same_job(cfg, saved["config"], str(path))
    return {int(i): s["state_dict"] for i, s in saved["segments"].items()}


def adopt(stage: Stage, index: int, cfg: JobConfig, party: str, run_dir: str | Path | None) -> bool:
    """Load ``party``'s kept segment ``index`` into ``stage`` if its run directory has one of a finished run."""
    path = path_for(run_dir, party) if run_dir else None
    saved: dict[str, Any] | None = checkpoint.load(path) if path is not None else None
    if saved is None or saved.get("exit") != ExitReason.DONE.value or index not in saved["segments"]:
        return False
    if differences(cfg.agreed(), saved["config"]):
        log.warning("%s: not serving %s: it was written for another job", party, path)
        return False
    stage.load_weights(saved["segments"][index]["state_dict"])
    stage.version = int(saved["segments"][index]["version"])
    log.info("%s: serving the segment of a finished run from %s", party, path)
    return True


def _same_job(cfg: JobConfig, saved: dict[str, Any], where: str) -> None:
    diffs = differences({k: v for k, v in cfg.agreed().items()}, {k: v for k, v in saved.items() if k != "client_id"})
    if diffs:
        raise ConfigError(f"{where} was written for another job: " + "; ".join(diffs))
