"""The split-learning configurations, end to end on the real broker, each party its own process."""
from __future__ import annotations

import json
from pathlib import Path

import pika
import torch

from splitmq.shared import checkpoint, local, topology, wire
from splitmq.shared.config import JobConfig
from tests.helpers import Party, job_args


def _weights_match(state: dict[str, torch.Tensor], full: dict[str, torch.Tensor], offset: int) -> None:
    for name, value in state.items():
        index, rest = name.split(".", 1)
        torch.testing.assert_close(value, full[f"{int(index) + offset}.{rest}"], atol=1e-5, rtol=0)


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())


def test_three_hop_chain_matches_local_training_step_by_step(amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given alice -> bob -> claire holding three segments of the MLP, one batch in flight
    cfg = JobConfig(job_id=job_id, num_clients=1, epochs=1, cuts=(2, 4), bottom_sync="independent")
    common = job_args(cfg, amqp_url) + ["--checkpoint-dir", str(tmp_path / "ckpt")]
    claire = Party("claire", ["server", *common, "--stage", "claire", "--segment", "2",
                              "--summary-json", str(tmp_path / "claire.json")], tmp_path)
    bob = Party("bob", ["server", *common, "--stage", "bob", "--segment", "1", "--next-stage", "claire"], tmp_path)

    # When alice trains through the chain
    alice = Party("alice", ["worker", *common, "--client-id", "client-0", "--dest-stage", "bob", "--no-eval",
                            "--summary-json", str(tmp_path / "alice.json")], tmp_path)
    assert alice.wait() == 0, alice.log()
    assert bob.stop() == 0 and claire.stop() == 0, bob.log() + claire.log()

    # Then every step's loss and every segment's final weights equal local training's
    reference = local.train_local(cfg)
    losses = _summary(tmp_path / "alice.json")["losses"]
    assert len(losses) == len(reference.losses)
    assert max(abs(a - b) for a, b in zip(losses, reference.losses)) <= 1e-5
    full = reference.model.state_dict()
    _weights_match(checkpoint.load(tmp_path / "ckpt" / "client-0.pt")["stage"]["segment"], full, 0)
    _weights_match(checkpoint.load(tmp_path / "ckpt" / "bob.pt")["stage"]["segment"], full, 2)
    _weights_match(checkpoint.load(tmp_path / "ckpt" / "claire.pt")["stage"]["segment"], full, 4)


def _spy(amqp_url: str, job: str, routing_keys: list[str]) -> str:
    """A queue that receives a copy of every activation and every reply of the job."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = conn.channel()
    name = f"splitmq.{job}.spy"
    ch.exchange_declare(topology.activations_exchange(job), "topic", durable=True)
    ch.exchange_declare(topology.gradients_exchange(job), "direct", durable=True)
    ch.queue_declare(name, durable=True)
    ch.queue_bind(name, topology.activations_exchange(job), "#")
    for key in routing_keys:
        ch.queue_bind(name, topology.gradients_exchange(job), key)
    conn.close()
    return name


def test_u_shaped_run_matches_local_training_and_never_sends_labels_or_logits(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given a data owner holding the bottom, the head and the labels; the server only the middle
    cfg = JobConfig(job_id=job_id, num_clients=1, epochs=1, cuts=(2, 4), bottom_sync="independent",
                    label_source="top")
    spy = _spy(amqp_url, job_id, ["client-0", "mid"])
    common = job_args(cfg, amqp_url) + ["--checkpoint-dir", str(tmp_path / "ckpt")]
    head = Party("head", ["server", *common, "--stage", "client-0-head", "--segment", "2", "--private-outputs",
                          "--summary-json", str(tmp_path / "head.json")], tmp_path)
    mid = Party("mid", ["server", *common, "--stage", "mid", "--segment", "1", "--next-stage", "@head"], tmp_path)

    # When the owner trains (and evaluates) through the server's middle segment
    owner = Party("owner", ["worker", *common, "--client-id", "client-0", "--dest-stage", "mid"], tmp_path)
    assert owner.wait() == 0, owner.log()
    assert mid.stop() == 0 and head.stop() == 0, mid.log() + head.log()

    # Then the run equals local training step by step
    reference = local.train_local(cfg)
    losses = _summary(tmp_path / "head.json")["losses"]
    assert max(abs(a - b) for a, b in zip(losses, reference.losses)) <= 1e-5 and len(losses) == len(reference.losses)
    full = reference.model.state_dict()
    _weights_match(checkpoint.load(tmp_path / "ckpt" / "client-0.pt")["stage"]["segment"], full, 0)
    _weights_match(checkpoint.load(tmp_path / "ckpt" / "mid.pt")["stage"]["segment"], full, 2)
    _weights_match(checkpoint.load(tmp_path / "ckpt" / "client-0-head.pt")["stage"]["segment"], full, 4)
    # And of every message that crossed the broker, none held labels, logits, a loss or an accuracy
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
            assert msg.loss == -1.0 and msg.correct == -1
    ch.queue_delete(spy)
    conn.close()
    steps = len(reference.losses)
    assert seen["forward"] >= 2 * steps and seen["backward"] >= 2 * steps  # four messages per step


def test_vertical_split_learns_like_the_same_model_trained_locally(amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given two parties holding the left and right image columns of the same samples
    cfg = JobConfig(job_id=job_id, num_clients=1, vertical_parts=2, epochs=6, bottom_sync="independent",
                    label_source="top", max_in_flight=2)
    common = job_args(cfg, amqp_url)
    top = Party("top", ["server", *common, "--summary-json", str(tmp_path / "top.json")], tmp_path)

    # When both train against the top, which joins their parts by sample id
    parties = [Party(f"p{i}", ["worker", *common, "--client-id", f"client-{i}", "--client-index", str(i),
                               "--summary-json", str(tmp_path / f"p{i}.json")], tmp_path) for i in range(2)]
    for p in parties:
        assert p.wait() == 0, p.log()
    assert top.stop() == 0, top.log()

    # Then the test accuracy is within 1.5 points of the same model trained in one process
    reference = local.train_local(cfg)
    accuracy = _summary(tmp_path / "p0.json")["test_accuracy"]
    assert abs(accuracy - reference.test_accuracy) <= 0.015, (accuracy, reference.test_accuracy)
    assert _summary(tmp_path / "top.json")["skipped"] == 0


def test_vertical_party_stopping_mid_run_skips_its_batches_instead_of_hanging(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given a vertical job whose top gives a batch up after 0.5 s without all parts
    cfg = JobConfig(job_id=job_id, num_clients=1, vertical_parts=2, epochs=2, bottom_sync="independent",
                    label_source="top", max_in_flight=4)
    common = job_args(cfg, amqp_url)
    top = Party("top", ["server", *common, "--vertical-timeout", "0.5", "--metrics-port", "0",
                        "--summary-json", str(tmp_path / "top.json")], tmp_path)
    p0 = Party("p0", ["worker", *common, "--client-id", "client-0", "--client-index", "0", "--no-eval",
                      "--summary-json", str(tmp_path / "p0.json")], tmp_path)
    p1 = Party("p1", ["worker", *common, "--client-id", "client-1", "--client-index", "1", "--no-eval",
                      "--checkpoint-dir", str(tmp_path / "ckpt1"), "--checkpoint-every", "4"], tmp_path)

    # When party 1 is killed once it has trained a little
    _wait_for_checkpoint(tmp_path / "ckpt1" / "client-1.pt", p1)
    p1.kill()

    # Then party 0 still finishes (no hang), and the top reports the skipped batches
    assert p0.wait(240) == 0, p0.log()
    assert top.stop() == 0, top.log()
    top_summary, p0_summary = _summary(tmp_path / "top.json"), _summary(tmp_path / "p0.json")
    assert top_summary["skipped"] > 0
    assert p0_summary["skipped"] == top_summary["skipped"]
    assert p0_summary["completed"]


def _wait_for_checkpoint(path: Path, party: Party, timeout: float = 120) -> None:
    """Block until ``party`` has written its first checkpoint (polls the file; fails on exit or timeout)."""
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        if party.proc.poll() is not None:
            raise AssertionError(f"{party.name} exited early:\n{party.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{party.name} wrote no checkpoint in {timeout}s:\n{party.log()}")
        time.sleep(0.1)  # polling a file another process writes; there is no event to await


def test_data_owners_taking_turns_reach_local_accuracy(amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given two data owners with different samples handing their bottom on to each other (SplitNN)
    # (the concurrent SplitFed-style averaging is shown by test_pipeline's demo test)
    cfg = JobConfig(job_id=job_id, num_clients=2, epochs=8, bottom_sync="handoff", max_in_flight=2)
    common = job_args(cfg, amqp_url)
    top = Party("top", ["server", *common], tmp_path)

    # When both train
    owners = [Party(f"o{i}", ["worker", *common, "--client-id", f"client-{i}", "--client-index", str(i),
                              "--summary-json", str(tmp_path / f"o{i}.json")], tmp_path) for i in range(2)]
    for o in owners:
        assert o.wait() == 0, o.log()
    assert top.stop() == 0, top.log()

    # Then the final model is within 1.5 points of the unsplit model trained on all the data
    reference = local.train_local(cfg)
    last = _summary(tmp_path / "o1.json")["test_accuracy"]
    assert abs(last - reference.test_accuracy) <= 0.015, (last, reference.test_accuracy)
