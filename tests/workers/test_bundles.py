"""Coalescing on the in-memory broker: packing, unpacking, per-part dedupe, refusals, acks.

Several batches travel in one ``bundle`` when ``coalesce`` > 1; each part is still gated,
deduplicated and applied on its own (docs/protocol.md, "Coalescing"). The real-broker run is
in tests/test_coalesce.py.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from splitmq.shared import codec, topology, wire
from splitmq.shared.config import JobConfig
from splitmq.shared.transport import Delivery, StubBroker
from splitmq.workers.acks import Acks
from splitmq.workers.exits import ExitReason
from splitmq.workers.outbox import Outbox
from splitmq.workers.roles.base import Send, ToParty, ToStage
from splitmq.workers.stats import Stats
from tests.stubs import forward, joined, start_server, start_worker, wait_for

CFG = JobConfig(job_id="stubjob", epochs=1, data="synthetic", max_in_flight=4, coalesce=4)


class Recorder:
    """A transport that keeps what is published and confirms it at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str]] = []

    def publish(self, exchange: str, routing_key: str, body: bytes, **props: Any) -> Future[None]:
        self.sent.append((routing_key, body, props["message_id"]))
        done: Future[None] = Future()
        done.set_result(None)
        return done


def outbox(most: int) -> tuple[Outbox, Recorder]:
    rec = Recorder()
    return Outbox(rec, codec.CutCodec.for_spec({}), name="client-0", job_id="stubjob", user_id=None,  # type: ignore[arg-type]
                  stats=Stats(), clock=lambda: 0.0, coalesce=most), rec


def batch_send(seq: int, dest: str = "top") -> Send:
    return Send(ToStage(dest), forward(CFG, seq), topology.batch_id("client-0", seq))


def bundle_of(cfg: JobConfig, msgs: list[wire.Forward]) -> wire.Bundle:
    return wire.Bundle(job_id=cfg.job_id, client_id="client-0", seq=msgs[0].seq,
                       parts=tuple((topology.batch_id("client-0", m.seq), m.encode()) for m in msgs))


def unpacked(replies: list[wire.AnyMessage]) -> list[wire.AnyMessage]:
    out: list[wire.AnyMessage] = []
    for r in replies:
        out += [wire.decode(body) for _, body in r.parts] if isinstance(r, wire.Bundle) else [r]
    return out


def test_six_forwards_to_one_stage_and_one_to_another_travel_as_two_bundles_and_one_plain_message() -> None:
    # Given an outbox of a job that coalesces up to four batches per message
    box, rec = outbox(4)
    # When a loop pass sends batches 0..5 to the top and batch 6 to another stage, then flushes
    lone_send = batch_send(6, "mid")
    futures = [box.publish(batch_send(seq)) for seq in range(6)] + [box.publish(lone_send)]
    assert rec.sent == []  # kept until the pass ends
    box.flush()
    # Then the top gets a bundle of 0..3 and one of 4..5, in order; the lone batch travels as itself
    first, second = (wire.decode(body) for _, body, _ in rec.sent[:2])
    assert isinstance(first, wire.Bundle) and isinstance(second, wire.Bundle)
    assert [wire.decode(b).seq for _, b in first.parts] == [0, 1, 2, 3]
    assert [cid for cid, _ in second.parts] == [topology.batch_id("client-0", s) for s in (4, 5)]
    assert rec.sent[2][1] == lone_send.msg.encode()
    # And each send's own future settles with its message's confirmation; message ids are unique
    assert all(f.done() and f.exception() is None for f in futures)
    assert len({mid for _, _, mid in rec.sent}) == 3


def test_with_coalesce_one_every_send_is_published_at_once_byte_for_byte_as_before() -> None:
    # Given an outbox of a job that does not coalesce
    box, rec = outbox(1)
    msg = forward(CFG, 0)
    # When it sends two batches
    box.publish(Send(ToStage("top"), msg, "c0"))
    box.publish(batch_send(1))
    # Then each is published at once as its own message, the same bytes as the message's encoding
    assert len(rec.sent) == 2 and rec.sent[0][1] == msg.encode()


def test_a_hello_after_kept_answers_flushes_them_first_so_order_per_queue_is_kept() -> None:
    # Given two answers kept for the end of the pass
    box, rec = outbox(4)
    for seq in (0, 1):
        answer = wire.Backward(job_id="stubjob", client_id="client-0", seq=seq)
        box.publish(Send(ToParty("client-0"), answer, f"c{seq}"))
    # When something that never travels in a bundle is sent
    box.publish(Send(ToParty("client-0"), wire.Hello(job_id="stubjob", client_id="client-0", seq=0), "h"))
    # Then the answers went first, in one bundle, then the hello
    kinds = [wire.decode(body).kind for _, body, _ in rec.sent]
    assert kinds == [wire.Kind.BUNDLE, wire.Kind.HELLO]


def test_a_bundle_is_acked_only_once_every_part_is_settled() -> None:
    # Given a bundle's delivery split into three parts
    acks = Acks(checkpointing=False)
    whole = Delivery("q", b"all", 7, 1, False, "m", "c", "client-0", None)
    parts = [Delivery("q", bytes([i]), 7, 1, False, f"m{i}", f"c{i}", "client-0", None) for i in range(3)]
    acks.split(whole, parts)
    # When two parts are finished, then the third
    for part in parts[:2]:
        acks.finish(part, [], durable=False)
    early = acks.ready()
    acks.finish(parts[2], [], durable=False)
    # Then nothing is acked until the last part is, and then the bundle's delivery once
    assert early == [] and acks.ready() == [whole]


def test_the_checkpoint_rule_counts_a_bundle_once_as_the_broker_holds_it() -> None:
    # Given a checkpointing party with a bundle of four parts and one message that came alone
    acks = Acks(checkpointing=True)
    whole = Delivery("q", b"all", 7, 1, False, "m", "c", "client-0", None)
    parts = [Delivery("q", bytes([i]), 7, 1, False, f"m{i}", f"c{i}", "client-0", None) for i in range(4)]
    alone = Delivery("q", b"one", 8, 1, False, "a", "a", "client-0", None)
    acks.split(whole, parts)
    # When every part and the lone message are applied and confirmed, awaiting a checkpoint
    for d in [*parts, alone]:
        acks.finish(d, [], durable=True)
    acks.ready()
    # Then two messages wait for it (``checkpoint_every`` counts the broker's messages), and the
    # checkpoint acks exactly those two
    assert acks.pending_checkpoint == 2
    assert sorted(d.delivery_tag for d in acks.checkpointed()) == [7, 8]


def test_a_redelivered_bundle_applies_only_its_parts_not_applied_before_and_is_answered_in_one_message() -> None:
    # Given a stub trainer of a coalescing job that applied batch 0 (sent alone)
    _, srv, client = joined(CFG)
    client.send(forward(CFG, 0), topology.batch_id("client-0", 0))
    wait_for(lambda: srv.roles[1].ledger.count("client-0") == 1, "batch 0 applied")
    wait_for(client.replies, "batch 0's answer")
    # When a bundle of batches 0, 1 and 2 arrives (a re-send after a crash)
    client.send(bundle_of(CFG, [forward(CFG, s) for s in (0, 1, 2)]), topology.batch_id("client-0", 0))
    replies = wait_for(client.replies, "the bundle's answer")
    # Then one message answers all three: 0 is a duplicate, 1 and 2 are applied, each once
    assert len(replies) == 1 and isinstance(replies[0], wire.Bundle)
    answers = unpacked(replies)
    assert [(a.seq, a.outcome) for a in answers if isinstance(a, wire.Backward)] == [
        (0, "duplicate"), (1, "applied"), (2, "applied")]
    assert srv.roles[1].ledger.count("client-0") == 3 and srv.roles[1].stage.version == 3
    # And the bundle's delivery was acked (nothing left unacked on the forward queue)
    wait_for(lambda: not srv.transport.unacked, "the bundle's delivery to be acked")
    srv.finish()


def test_a_bundle_of_four_full_batches_passes_the_gate_though_it_is_bigger_than_one_batch_may_be() -> None:
    # Given a stub trainer of a job coalescing four batches of 64 samples
    _, srv, client = joined(CFG)
    bundle = bundle_of(CFG, [forward(CFG, s, batch=64) for s in range(4)])
    assert len(bundle.encode()) > srv.roles[1].inbound()[0].limit()
    # When the bundle arrives
    client.send(bundle, topology.batch_id("client-0", 0))
    answers = unpacked(wait_for(client.replies, "the bundle's answer"))
    # Then all four batches are applied
    assert [a.outcome for a in answers if isinstance(a, wire.Backward)] == ["applied"] * 4
    srv.finish()


def test_a_bundle_with_one_bad_part_or_more_batches_than_agreed_is_dead_lettered_whole_with_its_reason() -> None:
    # Given a stub trainer of a job coalescing up to four batches
    hub, srv, client = joined(CFG)
    # When a bundle carries another owner's batch, and another bundle five batches
    mixed = bundle_of(CFG, [forward(CFG, 0), forward(CFG, 1, client="client-1")])
    client.send(mixed, topology.batch_id("client-0", 0))
    first = wait_for(client.replies, "the first refusal")
    client.send(bundle_of(CFG, [forward(CFG, s) for s in range(5)]), topology.batch_id("client-0", 0))
    second = wait_for(client.replies, "the second refusal")
    # Then both are refused whole, with their reasons, and no batch of either was applied
    assert isinstance(first[0], wire.Backward) and first[0].outcome == "refused"
    assert first[0].error.startswith("identity") and first[0].seq == 0
    assert isinstance(second[0], wire.Backward) and second[0].error.startswith("size")
    assert srv.roles[1].ledger.count("client-0") == 0
    with hub.lock:
        dead = list(hub.queues[topology.dead_letter_queue(CFG.job_id)].ready)
    reasons = [m.props["headers"]["x-splitmq-reason"] for m in dead]
    whole = [m.body for m in dead]
    assert reasons == ["identity", "size"] and whole[0] == mixed.encode()
    srv.finish()


def test_a_job_that_does_not_coalesce_refuses_a_bundle_as_a_kind_it_does_not_take() -> None:
    # Given a stub trainer of a job with coalesce = 1
    cfg = CFG.replace(coalesce=1)
    _, srv, client = joined(cfg)
    # When a bundle of two batches arrives
    client.send(bundle_of(cfg, [forward(cfg, 0), forward(cfg, 1)]), topology.batch_id("client-0", 0))
    answer = wait_for(client.replies, "the refusal")
    # Then it is refused (kind) and nothing is applied
    assert isinstance(answer[0], wire.Backward) and answer[0].error.startswith("kind")
    assert srv.roles[1].ledger.count("client-0") == 0
    srv.finish()


def test_four_in_flight_with_coalesce_four_trains_every_batch_once_in_fewer_messages() -> None:
    # Given the same one-epoch job with four batches in flight, without and with coalescing
    sent: dict[int, tuple[int, int]] = {}
    for most in (1, 4):
        cfg = CFG.replace(coalesce=most)
        hub = StubBroker()
        srv = start_server(hub, cfg)
        # When the owner trains
        owner_run = start_worker(hub, cfg)
        owner = owner_run.wait()
        assert srv.wait().reason is ExitReason.DONE and owner.reason is ExitReason.DONE
        # Then every batch was applied once on each side
        assert srv.roles[1].ledger.count("client-0") == owner.summary["batches"] == owner.summary["batches_applied"]
        sent[most] = (owner_run.stats.counts["messages_sent"], srv.stats.counts["messages_sent"])
    # And coalescing sent under half as many messages from each side
    for side in (0, 1):
        assert sent[4][side] < sent[1][side] / 2, sent
