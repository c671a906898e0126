"""A model of the user's own (tests/user_model.py), loaded by import path in separate processes:
parity, crash safety with AdamW, and a join that refuses a model that does not fit."""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from splitmq.shared import local
from splitmq.shared.config import BottomSync, JobConfig
from tests.conftest import RESTART_ADMIN, delete_job
from tests.helpers import Party, assert_segments_equal, job_file, server_party, state, worker_party
from tests.test_crash_recovery import soak

ADAMW = dict(optimizer="AdamW", lr=0.002, optimizer_args=(("weight_decay", 0.01),))


def test_a_user_model_with_adamw_in_separate_processes_matches_local_training_step_by_step(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given a model from a module of the user's, cut by name, trained with AdamW, one batch in flight
    cfg = JobConfig(job_id=job_id, model="tests.user_model:build", cuts=("body",), epochs=1,
                    bottom_sync=BottomSync.INDEPENDENT, **ADAMW)  # type: ignore[arg-type]
    job = job_file(cfg, tmp_path)
    # When the trainer and the owner run as processes that load it by import path
    top = server_party(tmp_path, job, amqp_url).start()
    owner = worker_party(tmp_path, job, amqp_url, 0, "--no-eval").start()
    assert owner.wait() == 0 and top.wait() == 0, owner.tail() + top.tail()
    # Then every step and both segments (weights and AdamW's state) equal local training's
    reference = local.train_local(cfg)
    losses = owner.summary()["losses"]
    assert losses == reference.losses
    bottom, head = state(tmp_path, "client-0", "bottom"), state(tmp_path, "trainer", "top")
    assert_segments_equal([bottom["role"]["stage"]["segment"], head["role"]["stage"]["segment"]], reference.segments)
    assert head["role"]["stage"]["optimizer"]["state"]  # AdamW's moments are in the checkpoint


def test_a_user_model_with_adamw_killed_at_random_ends_bit_identical_to_local_training(
        restart_node: str, tmp_path: Path, parties: list[Party]) -> None:
    # Given the user's model built one part at a time (each party loads only its own), and AdamW
    job = "user" + os.urandom(4).hex()
    cfg = JobConfig(job_id=job, model="tests.user_model:build_part", epochs=2,
                    bottom_sync=BottomSync.INDEPENDENT, **ADAMW)  # type: ignore[arg-type]
    seed = random.randrange(1 << 30)
    try:
        # When trainer, owner or both are killed at random six times
        soak(cfg, restart_node, tmp_path, parties, random.Random(seed), 6, seed)
        # Then each batch was applied once per side and both segments equal uninterrupted local training
        top, bottom = state(tmp_path, "trainer", "top"), state(tmp_path, "client-0", "bottom")
        assert top["ledger"]["client-0"] == bottom["ledger"]["client-0"] == {"prefix": 125, "above": []}
        reference = local.train_local(cfg.replace(job_id="reference")).segments
        for got, want in ((bottom, reference[0]), (top, reference[1])):
            for name, value in got["role"]["stage"]["segment"].items():
                assert torch.equal(value, want.state_dict()[name]), f"{name} (seed {seed})"
    finally:
        delete_job(job, RESTART_ADMIN)


def test_a_model_that_does_not_fit_is_refused_at_start_on_both_sides_with_the_differences(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given an owner whose bottom sends 32 features to a top that takes 48
    cfg = JobConfig(job_id=job_id, model="tests.user_model:narrow_bottom", epochs=1)
    job = job_file(cfg, tmp_path)
    top = server_party(tmp_path, job, amqp_url, ckpt=False).start()
    owner = worker_party(tmp_path, job, amqp_url, 0, ckpt=False).start()
    # Then both stop at start with a configuration exit naming the shapes
    assert owner.wait(180) == 3 and top.wait(180) == 3, owner.tail() + top.tail()
    for party in (owner, top):
        assert "cut_shape" in party.log.read_text() and "[32]" in party.log.read_text(), party.tail()
