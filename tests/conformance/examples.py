"""The example messages of docs/protocol.md, made with the real encoder (``shared/wire.py``).

Each example is a message as a party really sends it, shown as msgpack-JSON: the msgpack map
written as JSON, with every msgpack ``bin`` value (tensor bytes, PSI bytes) written as
``{"$bin": "<hex>"}``. ``tests/conformance/test_protocol_page.py`` turns every block of the page
back into msgpack and compares it, byte for byte, with ``EXAMPLES[name].encode()``: the page
cannot drift from the code. After a deliberate change of the wire format, regenerate the
blocks with ``python -m tests.conformance.examples --write`` (``--print`` shows them).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import msgpack
import torch

from splitmq.shared import models, topology, wire
from splitmq.shared.config import JobConfig

PAGE = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
#: A block of the page: ``<!-- example: NAME -->`` then a fenced json block.
BLOCK = re.compile(r"<!-- example: ([a-z0-9-]+) -->\n```json\n(.*?)\n```", re.S)

T0 = 1700000000.25   # created_at of every example (a float: Unix time)
JOB = topology.DEFAULT_JOB
ME = "client-0"


def owner_spec() -> dict[str, Any]:
    """The default job's agreed settings plus the built-in MLP bottom's fingerprint."""
    bottom = models.build_segments("mlp", (), 0)[0]
    return {**JobConfig().agreed(), "cut_shape": [640], "cut_dtype": "float32",
            "bottom_params": models.parameter_shapes(bottom)}


def _examples() -> dict[str, wire.Message]:
    acts = torch.tensor([[0.5, 0.0, 0.25, 2.0], [0.0, 1.5, 0.75, 3.0]])          # (2, 4): a toy cut
    grad = torch.tensor([[0.125, -0.25, 0.0, 0.5], [-0.5, 0.0, 0.25, -0.125]])  # same shape as acts
    labels, ids = torch.tensor([7, 2]), torch.tensor([1042, 17])
    bottom = {"fc1.weight": torch.tensor([[0.5, -0.5, 0.25], [0.0, 1.0, -1.0]]), "fc1.bias": torch.tensor([0.0, 0.5])}
    common = {"job_id": JOB, "client_id": ME, "created_at": T0}
    return {
        "hello": wire.Hello(**common, seq=0, spec=owner_spec(),
                            facts={"client_index": 0, "num_samples": 4000, "batches_per_epoch": 63,
                                   "applied_prefix": -1}),
        "hello-answer": wire.Hello(**common, seq=0, spec=JobConfig().agreed(),
                                   facts={"stage": "top", "applied_prefix": -1, "applied_above": []}),
        "hello-refused": wire.Hello(**common, seq=0, spec=JobConfig(epochs=2).agreed(),
                                    facts={"stage": "top", "applied_prefix": -1, "applied_above": []},
                                    error="epochs: here 2, peer 5"),
        "forward": wire.Forward(**common, seq=65, model_version=65, activations=acts, labels=labels,
                                sample_ids=ids, train=True, epoch=1),
        "forward-eval": wire.Forward(**common, seq=3, model_version=63, activations=acts, labels=labels,
                                     sample_ids=ids, train=False, epoch=0, eval_batches=16),
        "backward-applied": wire.Backward(**common, seq=65, model_version=66, grad=grad, loss=0.3125),
        "backward-evaluated": wire.Backward(**common, seq=15, model_version=63, outcome="evaluated",
                                            metrics={"loss": 0.28125, "accuracy": 0.9125}),
        "backward-duplicate": wire.Backward(**common, seq=65, outcome="duplicate"),
        "backward-skipped": wire.Backward(**common, seq=65, model_version=66, outcome="skipped"),
        "backward-refused": wire.Backward(**common, seq=65, outcome="refused",
                                          error="batch_size: batch of 65, allowed 1..64"),
        "backward-rejoin": wire.Backward(**common, seq=65, outcome="rejoin",
                                         error="client-0 has not joined this job (send hello first)"),
        "weights": wire.Weights(**common, seq=0, model_version=63, tensors=bottom, num_samples=2000),
        "weights-average": wire.Weights(**common, seq=0, tensors={k: v / 2 for k, v in bottom.items()}),
        "bye": wire.Bye(**common, seq=126, completed=True),
        "align-request": wire.Align(**common, seq=0, phase="request",
                                    tensors={"request": torch.tensor([8, 1, 18, 4], dtype=torch.uint8),
                                             "count": torch.tensor([5000])}),
        "align-response": wire.Align(**common, seq=0, phase="response",
                                     tensors={"setup": torch.tensor([10, 2, 8, 1], dtype=torch.uint8),
                                              "response": torch.tensor([10, 3], dtype=torch.uint8)}),
        "align-result": wire.Align(**common, seq=0, phase="result",
                                   tensors={"train_ids": torch.tensor([0, 3, 4]), "test_ids": torch.tensor([1])}),
        "predict": wire.Predict(**common, seq=1, inputs=acts, sample_ids=ids,
                                request_id="client-0:predict:1-1700000000250000000", deadline=T0 + 30),
        "prediction": wire.Prediction(**common, seq=1, outputs=torch.tensor([[-0.25, -2.0], [-1.5, -0.5]]),
                                      request_id="client-0:predict:1-1700000000250000000"),
        "export": wire.Export(**common, seq=0, request_id="client-0:export-top:1", segment=1),
        "segment": wire.Segment(job_id=JOB, client_id="top", seq=0, created_at=T0, request_id="client-0:export-top:1",
                                segment=1, error="not approved: top has not approved an export of job mnist to "
                                                 "client-0"),
        "bundle": wire.Bundle(**common, seq=65, parts=(
            (topology.batch_id(ME, 65), wire.Backward(**common, seq=65, outcome="duplicate").encode()),
            (topology.batch_id(ME, 66), wire.Backward(**common, seq=66, model_version=67, outcome="skipped").encode()))),
    }


#: Every example of the page, by the name its block carries.
EXAMPLES: dict[str, wire.Message] = _examples()


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _render(value: Any, depth: int = 0) -> str:
    """The envelope and its maps one entry a line; tensors, lists and scalars on one line each."""
    wide = isinstance(value, dict) and depth < 2 and len(value) > 1 and set(value) != {"dtype", "shape", "data"}
    if not wide:
        return json.dumps(_jsonable(value), separators=(", ", ": "))
    pad = "  " * (depth + 1)
    lines = [f"{pad}{json.dumps(k)}: {_render(v, depth + 1)}" for k, v in value.items()]
    return "{\n" + ",\n".join(lines) + "\n" + "  " * depth + "}"


def render(msg: wire.Message) -> str:
    """A message as the page shows it (msgpack-JSON)."""
    return _render(msgpack.unpackb(msg.encode(), raw=False))


def _bins(pairs: list[tuple[str, Any]]) -> Any:
    if len(pairs) == 1 and pairs[0][0] == "$bin":
        return bytes.fromhex(pairs[0][1])
    return dict(pairs)


def to_msgpack(block: str) -> bytes:
    """A msgpack-JSON block of the page back into the msgpack bytes it stands for."""
    body: bytes = msgpack.packb(json.loads(block, object_pairs_hook=_bins), use_bin_type=True)
    return body


def page_blocks(text: str) -> dict[str, str]:
    """Every example block of the page, by name."""
    return {m.group(1): m.group(2) for m in BLOCK.finditer(text)}


def rewrite(text: str) -> str:
    """The page with every example block regenerated from the encoder."""
    def fresh(m: re.Match[str]) -> str:
        return f"<!-- example: {m.group(1)} -->\n```json\n{render(EXAMPLES[m.group(1)])}\n```"
    return BLOCK.sub(fresh, text)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="regenerate the example blocks of docs/protocol.md")
    args = p.parse_args(argv)
    if args.write:
        PAGE.write_text(rewrite(PAGE.read_text()))
        return 0
    for name, msg in EXAMPLES.items():
        print(f"<!-- example: {name} -->\n```json\n{render(msg)}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
