"""Acking several deliveries at once: one ``basic_ack(multiple=True)`` only where it is safe.

``ack_plan`` is pure; the last test runs on the real broker and checks that a multiple ack
never settles a delivery the party still holds.
"""
from __future__ import annotations

import queue

from splitmq.shared import amqp, topology
from splitmq.shared.broker import Broker
from splitmq.shared.transport import Delivery, ack_plan
from tests.helpers import wait_for


def test_a_run_from_the_lowest_unsettled_tag_goes_in_one_multiple_ack_and_the_rest_one_by_one() -> None:
    # Given tags 1..6 unsettled on a channel, and the party acking 1, 2, 3 and 5 (it still holds 4 and 6)
    # When the acks are planned
    upto, singles = ack_plan({1, 2, 3, 4, 5, 6}, {1, 2, 3, 5})
    # Then 1..3 go in one multiple ack up to 3, and 5 alone: 4 is never covered
    assert (upto, singles) == (3, [5])


def test_no_multiple_ack_when_an_older_delivery_is_still_held_or_only_one_is_acked() -> None:
    # Given tag 1 still held, When 2..4 are acked, Then each is acked alone (a multiple ack would settle 1)
    assert ack_plan({1, 2, 3, 4}, {2, 3, 4}) == (None, [2, 3, 4])
    # And a single delivery is a plain ack, as before
    assert ack_plan({7, 9}, {7}) == (None, [7])


def test_on_the_real_broker_a_multiple_ack_leaves_the_held_delivery_unacked(amqp_url: str, job_id: str) -> None:
    # Given five messages in a queue, consumed by one connection
    q = topology.forward_queue(job_id)
    amqp.declare(amqp_url, topology.job_layout(job_id))
    sender = Broker(amqp_url, name="multi-ack-sender")
    sender.start()
    sender.wait_ready(10)
    for i in range(5):
        sender.publish(topology.activations_exchange(job_id), topology.forward_routing_key("client-0", "top"),
                       bytes([i]), message_id=f"m{i}").result(10)
    sender.close()
    got: queue.Queue[Delivery] = queue.Queue()
    b = Broker(amqp_url, name="multi-ack")
    b.consume(q, got.put)
    b.start()
    deliveries = [got.get(timeout=10) for _ in range(5)]
    # When it acks all but the fourth in one call, then disconnects
    b.ack_many([d for d in deliveries if d.body != bytes([3])])
    b.close()  # after the acks: the I/O thread runs them in order
    # Then exactly the fourth message is back in the queue
    wait_for(lambda: amqp.queue_depth(amqp_url, q) == 1, "the held message to be returned")
    assert [m.body for m in amqp.get_messages(amqp_url, q)] == [bytes([3])]
