"""Every tunable time and count of the party loop, documented once (rq's ``defaults.py``).

Each wait in splitmq has a deadline from this module (or the option that overrides it), logs
what it waits for and since when every ``WAIT_LOG_S``, and ends in a named exit
(``splitmq.workers.exits.ExitReason``). docs/guarantees.md has the table of every wait.
"""
from __future__ import annotations

#: How often the loop wakes when nothing arrives, to run timers, waits and checkpoints.
POLL_S = 0.2
#: A wait older than this is logged ("waiting for X since T"), and again at this interval.
WAIT_LOG_S = 15.0

# ---- connection -------------------------------------------------------------------------------
#: Reconnect backoff: first delay and cap (seconds); each delay is jittered down by up to half.
RECONNECT_BASE_S = 0.5
RECONNECT_CAP_S = 10.0
#: Pause before trying the next broker address of a cluster when one fails (a whole round of
#: failed addresses backs off as above): a dead node costs a refused connection, not a backoff.
NEXT_ADDRESS_S = 0.05
#: AMQP heartbeat: a silent dead connection is noticed within about two of these.
HEARTBEAT_S = 20
#: How long a party keeps trying to reach the broker (at start or after losing it) before exiting.
BROKER_TIMEOUT_S = 900.0
#: A nacked publish is sent again (same message id) for this long before the refusal is final:
#: RabbitMQ nacks publishes to a quorum queue for ~0.3 s after its leader node dies.
NACK_RETRY_S = 30.0
#: A publish nacked this long on one connection moves the party to another node (a fresh channel,
#: whose quorum-queue client finds the new leader: RabbitMQ 3.10's can stay on a stale one).
NACK_MOVE_S = 3.0

# ---- peers ------------------------------------------------------------------------------------
#: A data owner waits this long for the answer to any one batch or request, then exits.
PEER_TIMEOUT_S = 300.0
#: An unanswered batch is sent again (same seq, attempt + 1) after this long; re-sends are
#: idempotent, and cover a batch the broker dead-lettered while the trainer crashed repeatedly.
RESEND_AFTER_S = 120.0
#: With ``delivery = transient`` a broker restart loses the batches and answers it held: an
#: unanswered batch is sent again after this long (of service time: an outage does not count).
TRANSIENT_RESEND_AFTER_S = 5.0
#: With ``delivery = transient`` the trainer keeps the answers of each owner's last this many
#: applied batches, to send again when the owner re-sends one (its answer may have been lost);
#: an owner's ``max_in_flight`` may not exceed it. 64 float32 answers of 64 x 640 are 10 MB.
ANSWERS_KEPT = 64
#: Once the trainer has answered "applied before", the gradient must already be in the owner's
#: reply queue; if it does not arrive this soon, the owner's state is older than what it acked.
DUPLICATE_WAIT_S = 20.0
#: How long a data owner waits for a trainer at start (its hello unanswered or unroutable).
JOIN_TIMEOUT_S = 600.0
#: Pause between hellos while no stage consumes the destination queue yet.
JOIN_RETRY_S = 2.0
#: How long a party keeps trying to take its queue while another connection holds it.
LEASE_TIMEOUT_S = 60.0
#: A trainer with unfinished data owners exits after this long without any message.
IDLE_TIMEOUT_S = 1800.0
#: A turn-taking owner waits this long for the previous owner's bottom (hand-off).
TURN_TIMEOUT_S = 3600.0

# ---- rounds and joins -------------------------------------------------------------------------
#: A bottom-averaging round closes without the owners still absent this long after it opened.
SYNC_TIMEOUT_S = 120.0
#: A vertical batch is skipped if a party's part is missing this long after the first part.
VERTICAL_TIMEOUT_S = 30.0

# ---- serving -----------------------------------------------------------------------------------
#: An inference request's deadline: its requester (and every stage) gives up on it after this long.
PREDICT_TIMEOUT_S = 30.0
#: ``splitmq export`` waits this long for every segment holder's answer.
EXPORT_TIMEOUT_S = 60.0
#: How long ``splitmq predict`` waits for the broker and its own queues before its first request.
PREDICT_START_S = 60.0
#: How long past a request's own deadline a caller waits for the predictor's loop to settle it (or
#: to end): the loop fails a request at its deadline, so only a loop that is gone or stuck uses it.
PREDICT_GRACE_S = 60.0

# ---- handling ---------------------------------------------------------------------------------
#: A handler that raises is retried in place this many times (capped, jittered backoff) before
#: its message is dead-lettered and its sender told.
HANDLER_ATTEMPTS = 5
RETRY_BASE_S = 0.05
RETRY_CAP_S = 2.0

# ---- durability -------------------------------------------------------------------------------
#: Checkpoint at least this often while holding acks, however few messages came.
CHECKPOINT_INTERVAL_S = 5.0
#: A checkpoint waits this long for the broker to confirm the replies it covers, then exits:
#: a checkpoint must never cover a reply the broker does not hold.
CONFIRM_TIMEOUT_S = 900.0

# ---- compute ----------------------------------------------------------------------------------
#: Torch threads a party computes with (``--torch-threads``): small devices, predictable timing.
#: Local training (the baseline) uses the same count: on some CPUs (AVX-512 ones) a matrix
#: product's last bits depend on the thread count, and a synchronous split run must equal local
#: training step by step.
TORCH_THREADS = 1
#: Freed heap a party keeps mapped for its next messages (``io_tuning.keep_freed_memory``); blocks
#: up to half this size come from that heap. RSS stays near the process's peak instead of
#: dropping after each message: a few message sizes, not this figure, in practice.
HEAP_KEEP_BYTES = 64 * 1024 * 1024
