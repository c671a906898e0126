"""docs/protocol.md says what the code does: its examples, names, tables and limits are checked here.

Each example block is turned back into msgpack and compared byte for byte with what the real
encoder sends (tests/conformance/examples.py regenerates them after a deliberate change); each
table that lists a fixed set (kinds, outcomes, rejection reasons, agreed settings) must list
exactly the code's set; each number the page quotes must be the code's.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgpack

from splitmq.shared import defaults, ledger, models, tensors, topology, validate, wire
from splitmq.shared.config import FIELDS, BottomSync, JobConfig
from splitmq.shared.errors import DecodeError
from splitmq.shared.metrics import REJECT_REASONS
from splitmq.workers.roles.members import MODEL_KEYS, Members
from splitmq.workers.roles.sync import SyncDesk
from splitmq.workers.stats import Stats
from tests.conformance import client, examples

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "protocol.md").read_text()


def table(name: str) -> list[list[str]]:
    """The rows (cells, stripped) of the table after ``<!-- table: name -->``, header and rule skipped."""
    start = PAGE.index(f"<!-- table: {name} -->")
    lines = PAGE[start:].splitlines()[1:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[2:]


def names(name: str) -> list[str]:
    """The first column of a table: each row's name, without its backticks."""
    return [row[0].strip("`") for row in table(name)]


def arguments(name: str) -> dict[str, object]:
    block = re.search(rf"<!-- arguments: {name} -->\n```json\n(.*?)\n```", PAGE, re.S)
    assert block is not None, f"no <!-- arguments: {name} --> block on the page"
    return dict(json.loads(block.group(1)))


def test_every_example_on_the_page_is_byte_for_byte_what_the_encoder_sends() -> None:
    # Given the page's example blocks
    blocks = examples.page_blocks(PAGE)
    # Then there is one for every example, and one example at least of every kind the decoder knows
    assert set(blocks) == set(examples.EXAMPLES), "run: python -m tests.conformance.examples --write"
    assert {m.kind for m in examples.EXAMPLES.values()} == set(wire.Kind)
    for name, msg in examples.EXAMPLES.items():
        # When a block is turned back into msgpack
        body = examples.to_msgpack(blocks[name])
        # Then it is exactly the encoder's bytes, and decodes to a message of its kind
        assert body == msg.encode(), f"{name} differs: run python -m tests.conformance.examples --write"
        assert wire.decode(body).kind is msg.kind


def test_the_kinds_outcomes_and_reasons_tables_list_exactly_what_the_code_knows() -> None:
    # Given the page's tables of kinds, outcomes and rejection reasons
    # Then each lists exactly the code's set (the reasons in the metric's order)
    assert set(names("kinds")) == {k.value for k in wire.Kind}
    assert set(names("outcomes")) == {o.value for o in wire.Outcome}
    assert names("reasons") == list(REJECT_REASONS)


def test_the_spec_table_lists_every_agreed_setting_with_its_default_and_the_client_sends_them() -> None:
    # Given the page's spec table: key, msgpack type, default (as JSON), meaning
    documented = {row[0].strip("`"): json.loads(row[2].strip("`")) for row in table("spec")}
    # Then it is exactly the agreed settings with their defaults, in the code's order
    agreed = JobConfig().agreed()
    assert list(documented) == list(agreed), "add the new setting to the spec table of docs/protocol.md"
    assert documented == agreed
    # And the conformance client's spec is the page's, and the model keys and local settings are the code's
    assert client.DEFAULT_SPEC == documented
    for key in MODEL_KEYS:
        assert f"| `{key}` |" in PAGE
    local = [name for name, f in FIELDS.items() if f.metadata.get("local")]
    listed = re.search(r"Local settings \(([^)]*)\)", PAGE)
    assert listed is not None and re.findall(r"`(\w+)`", listed.group(1)) == local


def test_the_queue_arguments_shown_are_the_ones_the_parties_declare() -> None:
    def placeholder(args: dict[str, object]) -> dict[str, object]:
        return json.loads(json.dumps(args).replace("splitmq.JOB.", "splitmq.<job>."))
    assert arguments("forward") == placeholder(topology.forward_queue_arguments("JOB"))
    assert arguments("reply") == placeholder(topology.reply_queue_arguments("JOB"))
    assert arguments("dead-letter") == topology.dead_letter_queue_arguments()


def test_the_names_and_ids_the_page_gives_are_the_topology_module_s() -> None:
    for text in (topology.activations_exchange("JOB"), topology.gradients_exchange("JOB"),
                 topology.dead_letter_exchange("JOB"), topology.dead_letter_queue("JOB"),
                 topology.forward_queue("JOB", "STAGE"), topology.reply_queue("JOB", "PARTY"),
                 topology.lease_queue("JOB", "PARTY"), topology.forward_binding("STAGE")):
        assert f"`{text.replace('JOB', '<job>').replace('STAGE', '<stage>').replace('PARTY', '<party>')}`" in PAGE
    ids = [topology.batch_id("<client>", "<seq>"), topology.eval_id("<client>", "<e>", "<i>"),  # type: ignore[arg-type]
           *(topology.request_id("<client>", what, key) for what, key in
             (("hello", "<n>"), ("weights", "<e>"), ("handoff", "<e>"), ("turn", "<e>"), ("bye", 0), ("align", 0))),
           topology.relay_id("c", "stage"), topology.dead_letter_id("<original message_id>", "<nanoseconds>")]  # type: ignore[arg-type]
    missing = [i for i in ids if f"`{i}`" not in PAGE]
    assert not missing, missing


def _sync_limit(owners: int) -> int:
    members = Members(num_clients=owners, epochs=1, spec={}, compare_bottoms=True)
    members.model = {"bottom_params": models.parameter_shapes(models.build_segments("mlp", (), 0)[0])}
    desk = SyncDesk(members, mode=BottomSync.AVERAGE, job_id="j", forward_queue="q", timeout_s=1, stats=Stats())
    return desk.inbound()[0].limit()


def test_the_limits_and_constants_the_page_quotes_are_the_code_s() -> None:
    forward = validate.Limits(topology.DEFAULT_JOB, (640,), JobConfig().batch_size).max_body_bytes()
    quoted = {
        "default job's forward limit": f"**{forward:,} bytes**",
        "two owners' weights limit": f"**{_sync_limit(2):,} bytes**",
        "MAX_MESSAGE_BYTES": f"| `wire.MAX_MESSAGE_BYTES` | {wire.MAX_MESSAGE_BYTES:,} bytes",
        "ENVELOPE_BYTES": f"| `wire.ENVELOPE_BYTES` | {wire.ENVELOPE_BYTES:,} bytes",
        "MAX_SEQ_JUMP": f"`MAX_SEQ_JUMP` = {ledger.MAX_SEQ_JUMP}",
        "RESEND_AFTER_S": f"`RESEND_AFTER_S` = {defaults.RESEND_AFTER_S:g} s",
        "DUPLICATE_WAIT_S": f"`DUPLICATE_WAIT_S` = {defaults.DUPLICATE_WAIT_S:g} s",
        "JOIN_TIMEOUT_S": f"`JOIN_TIMEOUT_S` = {defaults.JOIN_TIMEOUT_S:g} s",
        "JOIN_RETRY_S": f"`JOIN_RETRY_S` = {defaults.JOIN_RETRY_S:g} s",
        "MAX_QUEUE_LENGTH": f"at most {topology.MAX_QUEUE_LENGTH:,} messages",
        "MAX_NDIM": f"at most {tensors.MAX_NDIM} dimensions",
        "SCHEMA_VERSION": f"always `{wire.SCHEMA_VERSION}`",
    }
    missing = {what: text for what, text in quoted.items() if text not in PAGE}
    assert not missing, missing
    # And the broker refuses what the page says it refuses
    conf = (ROOT / "broker_config" / "rabbitmq.conf").read_text()
    assert f"max_message_size = {wire.MAX_MESSAGE_BYTES}" in conf
    # And the dtypes the page lists are the wire's
    row = next(r for r in PAGE.splitlines() if r.startswith("| `dtype` | str |"))
    assert set(re.findall(r"`(\w+)`", row)) - {"dtype"} == set(tensors.DTYPES)


def test_the_page_says_what_the_decoder_accepts_and_refuses_about_types() -> None:
    # Given the page's training forward as a plain msgpack map
    obj: dict[str, Any] = msgpack.unpackb(examples.to_msgpack(examples.page_blocks(PAGE)["forward"]), raw=False)

    def decodes(changed: dict[str, Any]) -> bool:
        try:
            wire.decode(msgpack.packb(changed, use_bin_type=True))
        except DecodeError:
            return False
        return True
    # Then, as the page says: an int created_at is accepted; a float model_version and a bool seq are not
    assert decodes({**obj, "created_at": 1700000000})
    assert not decodes({**obj, "model_version": 0.0}) and not decodes({**obj, "seq": True})
    # And each required field is required, and the optional ones are not
    for key in ("schema", "kind", "job_id", "client_id", "seq", "tensors"):
        assert not decodes({k: v for k, v in obj.items() if k != key}), key
    optional = ("model_version", "created_at", "train", "epoch", "eval_batches", "attempt")
    assert decodes({k: v for k, v in obj.items() if k not in optional})
    # And an unknown field is refused
    assert not decodes({**obj, "priority": 1})
