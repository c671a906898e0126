"""Inference through the split and the trained model back, end to end on the real broker.

Each test trains a job (every party its own process), then asks for predictions of the
owner's whole test set through the serving stages, then exports the whole model with every
holder's consent, and checks the split's predictions equal the exported unsplit model's.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pika
import pytest
import torch

from splitmq.shared import topology, wire
from splitmq.shared.config import BottomSync, JobConfig, LabelSource
from splitmq.workers import assemble, export
from splitmq.workers.predict import PredictOptions, Predictor, predict_all
from splitmq.workers.roles.requests import PredictionError
from tests.helpers import Party, ROOT, consumers, job_file, server_party, spy_queue, wait_for, worker_party


def _train(tmp: Path, job: Path, url: str, owners: int, *servers: Party) -> None:
    """Train every owner to the end while the servers keep serving."""
    workers = [worker_party(tmp, job, url, i, "--no-eval", ckpt=False).start() for i in range(owners)]
    for w in workers:
        assert w.wait() == 0, w.tail()
    for s in servers:
        assert s.alive, s.tail()


def _export(tmp: Path, job: Path, url: str, out: Path, requester: str = "client-0") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "splitmq", "export", "--config", str(job), "--amqp-url", url,
                           "--as", requester, "--out", str(out), "--run-dir", str(tmp / "run"), "--timeout", "60"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _approve(tmp: Path, job_id: str, holder: str, requester: str = "client-0") -> None:
    subprocess.run([sys.executable, "-m", "splitmq", "approve-export", "--job-id", job_id, "--holder", holder,
                    "--requester", requester, "--run-dir", str(tmp / "run")], cwd=ROOT, check=True, timeout=120)


def _split_predictions(cfg: JobConfig, tmp: Path, url: str) -> tuple[torch.Tensor, torch.Tensor]:
    """client-0's predictions of its whole test set through the broker, and the sample ids."""
    test = assemble.owner_data(cfg, 0).test
    assert test is not None
    with Predictor(cfg, PredictOptions(client_index=0, run_dir=str(tmp / "run")), amqp_url=url) as p:
        outputs = predict_all(p, test, test.ids, batch_size=200, in_flight=3)
    assert len(outputs) == len(test)
    return outputs, test.ids


def test_vanilla_predictions_equal_the_exported_model_which_needs_the_top_s_approval(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given a vanilla job trained to the end, its top still serving
    cfg = JobConfig(job_id=job_id, epochs=1, bottom_sync=BottomSync.INDEPENDENT)
    job = job_file(cfg, tmp_path)
    top = server_party(tmp_path, job, amqp_url, "--serve-forever", ckpt=False).start()
    try:
        _train(tmp_path, job, amqp_url, 1, top)
        # When the owner asks for predictions of its whole test set through the broker
        outputs, _ids = _split_predictions(cfg, tmp_path, amqp_url)
        # And asks for the whole model before the top approved, then after
        refused = _export(tmp_path, job, amqp_url, tmp_path / "model.pt")
        _approve(tmp_path, job_id, "top")
        granted = _export(tmp_path, job, amqp_url, tmp_path / "model.pt")
        stopped = top.stop()
    finally:
        top.close()

    # Then the first export is refused, naming the holder that has not approved, and writes nothing
    assert refused.returncode == 1 and "not approved: top has not approved" in refused.stderr, refused.stderr
    # And after approval the whole model is a weights-only state_dict equal to the split on every test sample
    assert granted.returncode == 0, granted.stderr
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["config"]["job_id"] == job_id and "segments.0.fc1.weight" in saved["state_dict"]
    model, _ = export.load_model(tmp_path / "model.pt")
    test = assemble.owner_data(cfg, 0).test
    assert test is not None and isinstance(test.x, torch.Tensor)
    with torch.no_grad():
        assert (model(test.x) - outputs).abs().max() <= 1e-5
    # And the run kept the owner's and the top's final segments
    assert (tmp_path / "run" / "segments-client-0.pt").exists()
    assert stopped == 130 and (tmp_path / "run" / "segments-top.pt").exists()


def _drain(amqp_url: str, queue: str) -> list[wire.AnyMessage]:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch, out = conn.channel(), []
    while True:
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append(wire.decode(body))
    ch.queue_delete(queue)
    conn.close()
    return out


def test_u_shaped_predictions_stay_with_the_owner_and_equal_the_exported_model(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given a U-shaped job trained to the end: the owner holds bottom, head and labels; the server the middle
    cfg = JobConfig(job_id=job_id, epochs=1, cuts=("relu1", "relu2"), stages=("mid", "@head"),
                    bottom_sync=BottomSync.INDEPENDENT)
    job = job_file(cfg, tmp_path)
    mid = server_party(tmp_path, job, amqp_url, "--stage", "mid", "--serve-forever", name="mid", ckpt=False).start()
    try:
        _train(tmp_path, job, amqp_url, 1, mid)
        names = ["client-0", "mid", topology.head_stage("client-0")]
        spy = spy_queue(amqp_url, job_id, names + [topology.serve_address(n) for n in names])
        # When the owner predicts its whole test set through the server's middle segment
        outputs, _ids = _split_predictions(cfg, tmp_path, amqp_url)
        seen = _drain(amqp_url, spy)
        # And exports the whole model once the middle approved
        _approve(tmp_path, job_id, "mid")
        exported = _export(tmp_path, job, amqp_url, tmp_path / "model.pt")
    finally:
        mid.close()

    # Then no prediction, logit or label crossed any exchange: only cut activations went up, nothing came back
    assert not [m for m in seen if not isinstance(m, wire.Predict)], [m.kind for m in seen]
    assert len(seen) >= 2 * 5  # 5 requests, each owner -> mid -> the owner's head
    for msg in seen:
        assert isinstance(msg, wire.Predict) and msg.inputs is not None and msg.inputs.shape[1] in (128, 640)
    # And the exported whole model gives the same outputs on every test sample
    assert exported.returncode == 0, exported.stderr
    model, _ = export.load_model(tmp_path / "model.pt")
    test = assemble.owner_data(cfg, 0).test
    assert test is not None and isinstance(test.x, torch.Tensor)
    with torch.no_grad():
        assert (model(test.x) - outputs).abs().max() <= 1e-5


def test_vertical_predictions_join_every_party_and_a_missing_part_is_a_clear_timeout(
        amqp_url: str, job_id: str, tmp_path: Path) -> None:
    # Given a vertical job of two parties trained to the end, the top holding the labels
    cfg = JobConfig(job_id=job_id, vertical_parts=2, epochs=1, bottom_sync=BottomSync.INDEPENDENT,
                    label_source=LabelSource.TOP)
    job = job_file(cfg, tmp_path)
    top = server_party(tmp_path, job, amqp_url, "--serve-forever", "--vertical-timeout", "3", ckpt=False).start()
    part = Party(tmp_path, "client-1-serve", "predict", ["--config", str(job), "--amqp-url", amqp_url,
                                                         "--client-index", "1", "--run-dir", str(tmp_path / "run"),
                                                         "--serve"], metrics=False)
    try:
        _train(tmp_path, job, amqp_url, 2, top)
        # And party 1 serving its part of any sample the top asks for
        part.start()
        wait_for(lambda: consumers(amqp_url, topology.serve_queue(job_id, "client-1")) > 0, "party 1 to serve")
        # When party 0 predicts its whole test set (the top joins both parts of each request by sample id)
        outputs, ids = _split_predictions(cfg, tmp_path, amqp_url)
        # And exports the model once the top and party 1 approved
        for holder in ("top", "client-1"):
            _approve(tmp_path, job_id, holder)
        exported = _export(tmp_path, job, amqp_url, tmp_path / "model.pt")
        # And then asks for one more prediction after party 1 stopped serving
        assert part.stop() == 130
        test = assemble.owner_data(cfg, 0).test
        assert test is not None and isinstance(test.x, torch.Tensor)
        with Predictor(cfg, PredictOptions(client_index=0, run_dir=str(tmp_path / "run")), amqp_url=amqp_url) as p:
            with pytest.raises(PredictionError) as late:
                p.predict(test.x[:4], test.ids[:4])
    finally:
        part.close()
        top.close()

    # Then the split's predictions equal the exported model's on every test sample
    assert exported.returncode == 0, exported.stderr
    model, _ = export.load_model(tmp_path / "model.pt")
    parts = [assemble.owner_data(cfg, i).test for i in range(2)]
    assert all(p is not None and torch.equal(p.ids, ids) for p in parts)
    with torch.no_grad():
        assert (model([p.x for p in parts if p is not None]) - outputs).abs().max() <= 1e-5

    # And once party 1 no longer serves, a request ends in a timeout naming it, not a hang
    assert late.value.reason == "timeout" and "no part from client-1 within 3.0s" in late.value.detail
