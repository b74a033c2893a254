"""How the router cuts streams into work: task sizes, bundles, queue depths, pools.

Pure policy, no sockets: the numbers and the small functions the router and the workers
apply, each with the measurement that chose it.
"""

from __future__ import annotations

from typing import Any

import batchup_protocol as proto

__all__ = [
    "BUNDLE_HOLD_BATCHES",
    "BUNDLE_WAIT_S",
    "COSTS_KEPT",
    "GROUP",
    "GROUP_WORK_S",
    "IDLE_POOLS",
    "MIN_SLOTS",
    "WORKER_DEPTH",
    "bundle_hold",
    "cost_key",
    "group_size",
]

WORKER_DEPTH = 4  #: task messages queued per worker, so a worker never waits for the router
#: A task message carries up to GROUP batches of one stream, about GROUP_WORK_S of a
#: worker's time by the stream's measured cost per batch (one batch while unmeasured): the
#: router's and the workers' costs per message are paid once per group. That matters for
#: batches that take well under a millisecond to make, and also for slow ones (a 5 ms
#: augmentation): every message wakes a thread on each side, and on two cores the router
#: and the client take that time from the workers. For 5 ms batches, 25 ms (groups of 4)
#: with :func:`bundle_hold` halves the messages per batch, and 2 workers made 6% more
#: batches per second than with 12 ms and 2 ms bundles (interleaved runs, 9 rounds).
GROUP = 8
GROUP_WORK_S = 0.025
#: how long a worker holds finished batches of a group to send them as one bundle: at
#: least BUNDLE_WAIT_S, and the time of BUNDLE_HOLD_BATCHES batches, so slow batches
#: still share messages (see :func:`bundle_hold`)
BUNDLE_WAIT_S = 0.002
BUNDLE_HOLD_BATCHES = 1.5
#: fewest slots in a pool: the user's previous batch is still alive when the next is handed
#: out, so with fewer slots every batch would be copied out of its slot
MIN_SLOTS = 4
COSTS_KEPT = 32  #: kinds of stream whose cost per batch a client's state remembers
IDLE_POOLS = 4  #: pools a client keeps for its next streams (e.g. one iterator per epoch)


def bundle_hold(busy_s: float, made: int) -> float:
    """How long a worker goes on adding finished batches to a bundle after the first of
    them, when its task's first ``made`` batches took ``busy_s``: :data:`BUNDLE_WAIT_S`,
    or the time of :data:`BUNDLE_HOLD_BATCHES` batches when that is longer. Cheap batches
    go in bundles of several within about 2 ms; 5 ms batches go two or three at a time,
    halving the messages (and the client's wake-ups) per batch, which a reader with
    batches prefetched never notices."""
    if made <= 0:
        return BUNDLE_WAIT_S
    return max(BUNDLE_WAIT_S, BUNDLE_HOLD_BATCHES * busy_s / made)


def cost_key(msg: proto.OpenStream, batch_size: int) -> tuple[Any, ...]:
    """What makes two streams' batches cost a worker the same: their source, fields,
    batch size and transforms (a training loop's epochs)."""
    return (repr(msg.source), repr(msg.fields), batch_size, msg.include_indices, repr(msg.transforms))


def group_size(batch_s: float) -> int:
    """Batches per task message for a stream whose batches cost a worker ``batch_s``."""
    if batch_s <= 0:
        return 1
    return max(1, min(GROUP, int(GROUP_WORK_S / batch_s)))
