"""A data owner written only from docs/protocol.md trains against the real `splitmq server`.

The client (tests/conformance/client.py) may import pika, msgpack, numpy and torch, nothing from
splitmq; this test may use splitmq to hand it what the page cannot specify (its data, its batch
order, its bottom's initial weights) and to compute local training's losses for comparison.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from splitmq.shared import amqp, data, defaults, local, models, topology
from splitmq.shared.config import JobConfig
from tests.conformance import client
from tests.helpers import Party

CLIENT_SOURCE = Path(client.__file__)
#: Prints [every module imported, the relative ones] of the file named on the command line.
_IMPORTS = ("import ast, json, sys; t = ast.parse(open(sys.argv[1]).read()); w = list(ast.walk(t)); "
            "print(json.dumps([[a.name for n in w if isinstance(n, ast.Import) for a in n.names]"
            " + [n.module or '' for n in w if isinstance(n, ast.ImportFrom)],"
            " [n.module or '' for n in w if isinstance(n, ast.ImportFrom) and n.level]]))")
ALLOWED = {"pika", "msgpack", "numpy", "torch", "__future__"} | set(sys.stdlib_module_names)


def test_the_conformance_client_imports_nothing_but_pika_msgpack_numpy_torch_and_the_standard_library() -> None:
    # Given the client's source (parsed by a fresh interpreter: CPython 3.11's parser can trip on
    # recursion state that earlier tests left in this one, "AST constructor recursion depth mismatch")
    # When every import in it is collected
    out = subprocess.run([sys.executable, "-c", _IMPORTS, str(CLIENT_SOURCE)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    imported, relative = (set(v) for v in json.loads(out))
    # Then each is one of the allowed roots, none is relative, and nothing imports by name at run time
    assert {name.split(".")[0] for name in imported} <= ALLOWED, imported
    assert not relative and "splitmq" not in {name.split(".")[0] for name in imported}
    assert "importlib" not in imported and "__import__" not in CLIENT_SOURCE.read_text()


def _owner_data(cfg: JobConfig) -> client.OwnerData:
    """What the page cannot specify: this owner's samples and its batch order (seed + index)."""
    samples = data.load(cfg.data, data_dir=cfg.data_dir, test_fraction=cfg.test_fraction, client_index=0,
                        num_clients=cfg.num_clients)
    train, test = samples.train, samples.test
    assert test is not None and isinstance(train.x, torch.Tensor) and isinstance(test.x, torch.Tensor)
    assert train.y is not None and test.y is not None
    orders = [data.batch_order(len(train), cfg.batch_size, cfg.seed + 0, epoch) for epoch in range(cfg.epochs)]
    return client.OwnerData(train.x, train.y, train.ids, test.x, test.y, test.ids, orders)


def test_a_client_written_from_the_protocol_page_trains_two_epochs_exactly_like_local_training(
        amqp_url: str, job_id: str, tmp_path: Path, parties: list[Party]) -> None:
    # Given the default job for two epochs, trained locally for reference
    cfg = JobConfig(job_id=job_id, epochs=2)
    reference = local.train_local(cfg)
    # And the client's data, batch order and initial bottom as plain tensors (the same as local's)
    initial = {k: v.clone() for k, v in models.build_segments(cfg.model, cfg.cuts, cfg.seed)[0].state_dict().items()}
    settings = client.Settings(amqp_url, {**client.DEFAULT_SPEC, "job_id": job_id, "epochs": 2})
    # And `splitmq server` running the job as its own process
    server = Party(tmp_path, "trainer", "server", ["--job-id", job_id, "--epochs", "2", "--amqp-url", amqp_url,
                                                   "--run-dir", str(tmp_path / "run")])
    parties.append(server.start())

    # When the client joins, trains, evaluates after each epoch and says bye
    with local.torch_threads(defaults.TORCH_THREADS):  # the threads every party computes with
        result = client.Owner(settings, client.mlp_bottom(initial), _owner_data(cfg)).run()

    # Then the server finished by itself, rejected nothing, and left nothing in the dead-letter queue
    assert server.wait() == 0, server.tail()
    summary = server.summary()
    assert summary["exit"] == "done" and summary["rejected"] == {}, summary
    assert amqp.queue_depth(amqp_url, topology.dead_letter_queue(job_id)) == 0
    assert summary["batches_applied"] == result.applied == len(reference.losses) == 126
    # And every step's loss is local training's
    assert len(result.losses) == len(reference.losses)
    assert result.losses == reference.losses
    # And both evaluation passes came back with their metrics; the last one scores as the local model
    # does (within one of the 1,000 test samples, in case a float tie flips an arg-max)
    assert sorted(result.metrics) == [0, 1] and set(result.metrics[1]) == {"loss", "accuracy"}
    assert abs(result.metrics[1]["accuracy"] - reference.test_accuracy) <= 1e-3
