"""Vertical parties find the samples they share by private set intersection, and nothing about any
other sample leaves them: not in a message on the broker, not in a log, not in a checkpoint."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pika
import torch

from splitmq.shared import checkpoint, wire
from splitmq.workers.demo import write_job
from splitmq.workers.launch import PartySpec, run_parties
from tests.helpers import ROOT, spy_queue

sys.path.insert(0, str(ROOT / "examples"))
import vertical_hospitals as example  # noqa: E402  (an example module, importable from its folder)


def _ids_in(obj: object, found: set[int]) -> None:
    """Every integer (in tensors too) at or above the example's first patient id, anywhere in ``obj``."""
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point() and obj.numel():
            found.update(int(v) for v in obj.reshape(-1) if int(v) >= example.FIRST_ID)
    elif isinstance(obj, dict):
        for v in obj.values():
            _ids_in(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _ids_in(v, found)
    elif isinstance(obj, int) and obj >= example.FIRST_ID:
        found.add(obj)


def test_parties_with_partly_overlapping_ids_train_on_exactly_the_intersection_and_reveal_no_other_id(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given two hospitals each holding ~85% of the patients (~70% held by both) and a lab with every label
    cfg = example.job(epochs=2, job_id=job_id)
    held = [set((example.FIRST_ID + example.patients(i)).tolist()) for i in range(2)]
    shared = held[0] & held[1]
    assert 0.6 < len(shared) / example.PATIENTS < 0.8 and len(held[0]) > len(shared)
    lab_train = set(example.lab().train.ids.tolist())
    spy = spy_queue(amqp_url, job_id, ["client-0", "client-1", "top"])
    job = tmp_path / "job.toml"
    write_job(cfg, job)
    # When they align by PSI and train, every party checkpointing
    parties = [PartySpec("lab", "server", ("--data", "vertical_hospitals:lab", "--checkpoint-dir", str(tmp_path / "ck")))]
    parties += [PartySpec(f"hospital-{i}", "worker", ("--client-index", str(i), "--checkpoint-dir", str(tmp_path / "ck")))
                for i in range(2)]
    run = run_parties(job, parties, amqp_url=amqp_url, workdir=tmp_path,
                      env={"PYTHONPATH": str(ROOT / "examples")})
    # Then each trained on exactly the shared patients of the lab's training split
    expected = len(shared & lab_train)
    for i in range(2):
        assert run.summaries[f"hospital-{i}"]["samples"] == cfg.epochs * expected
    # And no message on the broker, no log and no checkpoint holds an id outside the intersection
    seen: set[int] = set()
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    while True:
        method, _props, body = ch.basic_get(spy, auto_ack=True)
        if method is None:
            break
        msg = wire.decode(body)
        _ids_in({f: getattr(msg, f) for f in ("sample_ids", "tensors", "labels") if hasattr(msg, f)}, seen)
    ch.queue_delete(spy)
    conn.close()
    assert seen and seen <= shared, sorted(seen - shared)[:5]
    logged = {int(m) for log in tmp_path.glob("*.log") for m in re.findall(r"\b9\d{5}\b", log.read_text())}
    assert logged <= shared, sorted(logged - shared)[:5]
    stored: set[int] = set()
    for path in (tmp_path / "ck").glob("*.pt"):
        _ids_in(checkpoint.load(path), stored)
    assert stored <= shared, sorted(stored - shared)[:5]
