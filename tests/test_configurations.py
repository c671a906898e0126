"""The split-learning configurations, end to end on the real broker, each party its own process."""
from __future__ import annotations

from pathlib import Path

import pika
import torch

from splitmq.shared import local, wire
from splitmq.shared.config import BottomSync, JobConfig, LabelSource
from tests.helpers import Party, assert_segments_equal, job_file, server_party, spy_queue, state, wait_for, worker_party


def test_three_hop_chain_matches_local_training_step_by_step(amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given alice -> bob -> claire holding three segments of the MLP, one batch in flight
    cfg = JobConfig(job_id=job_id, epochs=1, cuts=("relu1", "relu2"), stages=("bob", "claire"),
                    bottom_sync=BottomSync.INDEPENDENT)
    job = job_file(cfg, tmp_path)
    claire = server_party(tmp_path, job, amqp_url, "--stage", "claire", name="claire").start()
    bob = server_party(tmp_path, job, amqp_url, "--stage", "bob", name="bob").start()

    # When alice trains through the chain
    alice = worker_party(tmp_path, job, amqp_url, 0, "--no-eval").start()
    assert alice.wait() == 0, alice.tail()
    # Then every stage ends by itself once the owner has said goodbye
    assert bob.wait() == 0 and claire.wait() == 0, bob.tail() + claire.tail()

    # And every step's loss and every segment's final weights equal local training's
    reference = local.train_local(cfg)
    losses = alice.summary()["losses"]
    assert len(losses) == len(reference.losses)
    assert losses == reference.losses
    assert_segments_equal([state(tmp_path, "client-0", "bottom")["role"]["stage"]["segment"],
                           state(tmp_path, "bob", "relay")["role"]["stage"]["segment"],
                           state(tmp_path, "claire", "top")["role"]["stage"]["segment"]], reference.segments)


def test_u_shaped_run_matches_local_training_and_never_sends_labels_logits_or_scores(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given a data owner holding the bottom, its own head and the labels; the server only the middle
    cfg = JobConfig(job_id=job_id, epochs=1, cuts=("relu1", "relu2"), stages=("mid", "@head"),
                    bottom_sync=BottomSync.INDEPENDENT)
    spy = spy_queue(amqp_url, job_id, ["client-0", "mid"])
    job = job_file(cfg, tmp_path)
    mid = server_party(tmp_path, job, amqp_url, "--stage", "mid", name="mid").start()

    # When the owner trains (and evaluates) through the server's middle segment
    owner = worker_party(tmp_path, job, amqp_url, 0).start()
    assert owner.wait() == 0, owner.tail()
    assert mid.wait() == 0, mid.tail()

    # Then the run equals local training step by step, and the owner saw its own loss and accuracy
    reference = local.train_local(cfg)
    summary = owner.summary()
    losses = summary["head"]["losses"]
    assert len(losses) == len(reference.losses)
    assert losses == reference.losses
    assert summary["test_scores"]["accuracy"] == reference.test_accuracy
    assert_segments_equal([state(tmp_path, "client-0", "bottom")["role"]["stage"]["segment"],
                           state(tmp_path, "mid", "relay")["role"]["stage"]["segment"],
                           state(tmp_path, "client-0", "head")["role"]["stage"]["segment"]], reference.segments)
    # And of every message that crossed the broker, none held labels, logits, a loss or a score
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    seen = {"forward": 0, "backward": 0}
    while True:
        method, _props, body = ch.basic_get(spy, auto_ack=True)
        if method is None:
            break
        msg = wire.decode(body)
        if isinstance(msg, wire.Forward):
            seen["forward"] += 1
            assert msg.labels is None
            assert msg.activations.shape[1] != 10  # never the 10-class output
        elif isinstance(msg, wire.Backward):
            seen["backward"] += 1
            assert msg.loss is None and not msg.metrics
    ch.queue_delete(spy)
    conn.close()
    steps = len(reference.losses)
    assert seen["forward"] >= 2 * steps and seen["backward"] >= 2 * steps  # four messages per step


def test_vertical_split_learns_like_the_same_model_trained_locally(amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given two parties holding the left and right image columns of the same samples, labels at the top
    cfg = JobConfig(job_id=job_id, vertical_parts=2, epochs=6, bottom_sync=BottomSync.INDEPENDENT,
                    label_source=LabelSource.TOP, max_in_flight=2)
    job = job_file(cfg, tmp_path)
    top = server_party(tmp_path, job, amqp_url).start()

    # When both train against the top, which joins their parts by sample id
    parties = [worker_party(tmp_path, job, amqp_url, i).start() for i in range(2)]
    for p in parties:
        assert p.wait() == 0, p.tail()
    assert top.wait() == 0, top.tail()

    # Then the test accuracy is within 1.5 points of the same model trained in one process
    reference = local.train_local(cfg)
    accuracy = parties[0].summary()["test_scores"]["accuracy"]
    assert abs(accuracy - reference.test_accuracy) <= 0.015, (accuracy, reference.test_accuracy)
    assert top.summary()["skipped"] == 0


def test_vertical_party_stopping_mid_run_skips_its_batches_instead_of_hanging(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given a vertical job whose top gives a batch up after 0.5 s without all parts
    cfg = JobConfig(job_id=job_id, vertical_parts=2, epochs=2, bottom_sync=BottomSync.INDEPENDENT,
                    label_source=LabelSource.TOP, max_in_flight=4, checkpoint_every=4)
    job = job_file(cfg, tmp_path)
    top = server_party(tmp_path, job, amqp_url, "--vertical-timeout", "0.5", "--serve-forever").start()
    p0 = worker_party(tmp_path, job, amqp_url, 0, "--no-eval").start()
    p1 = worker_party(tmp_path, job, amqp_url, 1, "--no-eval").start()

    # When party 1 is killed once it has trained a little
    wait_for(lambda: p1.applied("worker") >= 8, "party 1's progress")
    p1.kill()

    # Then party 0 still finishes (no hang), and the top reports the skipped batches
    assert p0.wait() == 0, p0.tail()
    assert top.stop() == 130, top.tail()
    top_summary, p0_summary = top.summary(), p0.summary()
    assert top_summary["skipped"] > 0 and top_summary["exit"] == "interrupted"
    assert p0_summary["skipped"] == top_summary["skipped"]
    assert p0_summary["completed"]


def test_data_owners_taking_turns_reach_local_accuracy(amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given two data owners with different samples handing their bottom on to each other (SplitNN)
    # (the concurrent SplitFed-style averaging is shown by test_pipeline's demo test)
    cfg = JobConfig(job_id=job_id, num_clients=2, epochs=8, bottom_sync=BottomSync.HANDOFF, max_in_flight=2)
    job = job_file(cfg, tmp_path)
    top = server_party(tmp_path, job, amqp_url).start()

    # When both train
    owners = [worker_party(tmp_path, job, amqp_url, i).start() for i in range(2)]
    for o in owners:
        assert o.wait() == 0, o.tail()
    assert top.wait() == 0, top.tail()

    # Then the final model is within 1.5 points of the unsplit model trained on all the data
    reference = local.train_local(cfg)
    last = owners[1].summary()["test_scores"]["accuracy"]
    assert abs(last - reference.test_accuracy) <= 0.015, (last, reference.test_accuracy)


def test_a_job_with_every_default_and_one_owner_runs_to_the_end_on_its_own(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given the commands a new user types, with no flags but the job name
    common = ["--job-id", job_id, "--amqp-url", amqp_url, "--epochs", "1", "--run-dir", str(tmp_path)]
    top = Party(tmp_path, "top", "server", common).start()
    owner = Party(tmp_path, "owner", "worker", common).start()
    # Then both finish by themselves, with exit code 0, and no averaging round was waited for
    assert owner.wait() == 0, owner.tail()
    assert top.wait() == 0, top.tail()
    assert "average" not in owner.log.read_text() and owner.summary()["completed"]
    assert torch.isfinite(torch.tensor(owner.summary()["test_scores"]["accuracy"]))
