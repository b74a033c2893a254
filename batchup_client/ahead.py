"""Streams opened ahead for the next epoch of a training loop. No sockets here.

A training loop calls ``batch_iterator`` once per epoch with the same arguments and the
same RandomState. Opening each epoch's stream only when the loop asks for it leaves the
server's workers idle at every epoch boundary: the last batches of an epoch drain, then
the open round trip, the server's permutation and the first gather stand between the
reader and its next batch (about 4 ms of a 70 ms CIFAR epoch through shared memory).

So when a stream whose arguments were seen before learns its end (the server's
``EndOfStream``, sent as soon as the last batch is planned, with the RNG state the plan
ends at, protocol 1.6), the reader opens the next epoch's stream at once, from that state.
The next ``batch_iterator`` with the same arguments takes it over when the caller's RNG is
exactly in that state, which is batchup's own rule for the next permutation; otherwise the
stream opened ahead is closed and a new one opened, so the batches are batchup's in every
case. :class:`Ahead` keeps those streams, a few per connection (a training loop and its
validation loop each keep one), and remembers which arguments were seen, and which ones'
streams went unused (those stop being opened ahead).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

__all__ = ["KEPT", "MISSES", "REMEMBERED", "Ahead", "Opened"]

KEPT = 2  #: streams kept open ahead per connection (a training loop and a validation loop)
REMEMBERED = 16  #: argument sets remembered, to open ahead only for loops that repeat
#: streams opened ahead for one argument set and closed unused, in a row, after which that
#: set gets none (a new random subset every epoch, an RNG others draw from, more loops
#: than :data:`KEPT`): each such stream made batches for nothing
MISSES = 2


@dataclasses.dataclass(frozen=True)
class Opened:
    """A stream opened ahead: its arguments, its id and the RNG state it starts from."""

    key: Hashable
    plan_arrays: Sequence[Any]  #: copies of the plan's arrays when it was opened
    stream_id: int
    state: Any  #: ``RandomState.get_state()`` it was planned from; ``None``: no shuffle
    held: int = 0  #: batch credit held back until it is taken over (granted then)


def _same_arrays(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Equal by value (the stream's were copied when it was opened: a caller's index array
    may be the same object, changed in place since)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or not np.array_equal(x, y):
            return False
    return True


class Ahead:
    """The streams a connection opened ahead, and the argument sets it has seen."""

    def __init__(self, kept: int = KEPT, remembered: int = REMEMBERED):
        self.kept = kept
        self.remembered = remembered
        self._seen: collections.OrderedDict[Hashable, int] = collections.OrderedDict()  #: → misses
        self._opened: list[Opened] = []
        self.stats = {"streams_opened_ahead": 0, "streams_taken_over": 0, "streams_ahead_closed": 0}

    def repeats(self, key: Hashable) -> bool:
        """Note a stream with arguments ``key``; whether such a stream came before (and the
        streams opened ahead for it did not go unused :data:`MISSES` times in a row)."""
        misses = self._seen.get(key)
        self._seen[key] = misses or 0
        self._seen.move_to_end(key)
        while len(self._seen) > self.remembered:
            self._seen.popitem(last=False)
        return misses is not None and misses < MISSES

    def _missed(self, key: Hashable) -> None:
        if key in self._seen:
            self._seen[key] += 1

    def take(self, key: Hashable, plan_arrays: Sequence[Any]) -> Opened | None:
        """The stream opened ahead for these arguments, no longer kept here; or ``None``."""
        for i, opened in enumerate(self._opened):
            if opened.key == key and _same_arrays(opened.plan_arrays, plan_arrays):
                del self._opened[i]
                return opened
        return None

    def keep(self, opened: Opened) -> list[int]:
        """Keep a stream opened ahead; returns the ids of streams to close: one opened
        ahead for the same arguments before, and the oldest beyond :attr:`kept`."""
        drop = [o for o in self._opened if o.key == opened.key]
        self._opened = [o for o in self._opened if o.key != opened.key]
        self._opened.append(opened)
        self.stats["streams_opened_ahead"] += 1
        while len(self._opened) > self.kept:
            drop.append(self._opened.pop(0))
        self.stats["streams_ahead_closed"] += len(drop)
        for o in drop:
            self._missed(o.key)
        return [o.stream_id for o in drop]

    def taken_over(self, key: Hashable) -> None:
        self.stats["streams_taken_over"] += 1
        if key in self._seen:
            self._seen[key] = 0

    def unused(self, key: Hashable) -> None:
        """A stream taken for its arguments was closed: the caller's RNG had moved on."""
        self.stats["streams_ahead_closed"] += 1
        self._missed(key)

    def clear(self) -> list[int]:
        """Forget every stream opened ahead; returns their ids (to close)."""
        ids = [o.stream_id for o in self._opened]
        self._opened = []
        self.stats["streams_ahead_closed"] += len(ids)
        return ids

    def close_all(self, close_stream: Callable[[int], None]) -> None:
        """Close every stream opened ahead with the client's ``close_stream``."""
        for stream_id in self.clear():
            close_stream(stream_id)

    def info(self) -> dict[str, int]:
        """What a client's ``info()`` tells of them: how many are open, and their fate."""
        return {"streams_ahead_open": len(self._opened), **self.stats}

    def __len__(self) -> int:
        return len(self._opened)
