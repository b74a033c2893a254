"""Stream logic on the client: reordering, RNG parity and credits. No sockets here.

:func:`iterate` is the generator behind every remote ``batch_iterator``. It talks to a
connection through five methods (``open_stream``, ``next_item``, ``send_credit``,
``reseed``, ``close_stream``), so tests can drive it with a fake.

RNG parity (PROTOCOL.md, "RNG parity"): the server plans batches from a *copy* of the
caller's RNG state and reports the state after each batch that drew from it. When a
batch reaches the user, the caller's RNG is compared with the state it should have
before that batch: equal → it is set to the reported state (batchup's outcome);
different (the user drew from it, or another iterator shares it) → the server replans
from that batch with the caller's current state, and the speculative batches are void.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import weakref
from typing import Any, Protocol

import numpy as np

import batchup_protocol as proto

from .ahead import Ahead, Opened
from .errors import BatchupError, remote_error

__all__ = ["Inbox", "SlotPool", "UnsupportedShuffle", "admit_batch", "iterate", "resolve_shuffle"]

log = logging.getLogger("batchup_client")


class UnsupportedShuffle(TypeError, AttributeError):
    """``shuffle`` is not None, a bool or a ``numpy.random.RandomState``.

    Also an ``AttributeError``, which is what batchup raises for e.g. ``shuffle=1``.
    """


def resolve_shuffle(shuffle: Any) -> np.random.RandomState | None:
    """batchup's ``_get_shuffle_rng``, restricted to RNGs whose state can travel."""
    if shuffle is None or shuffle is False:
        return None
    if shuffle is True:
        return np.random.mtrand._rand  # the global RNG behind np.random.*
    if isinstance(shuffle, np.random.RandomState):
        return shuffle
    raise UnsupportedShuffle(
        f"shuffle should be None, False, True or a numpy.random.RandomState, but got "
        f"{type(shuffle).__name__} {shuffle!r:.60}"
    )


class Inbox:
    """Items of one stream that arrived ahead of their turn, keyed by sequence number."""

    def __init__(self) -> None:
        self.generation = 0
        self._items: dict[int, tuple[Any, list[Any]]] = {}
        self._failure: tuple[Any, list[Any]] | None = None
        self.end: int | None = None  #: the stream's length, once an EndOfStream arrived
        self.final_rng: dict[str, Any] | None = None  #: the RNG state its plan ends at (1.6)
        self._taken = 0  #: items before this sequence number were taken (handed out)
        #: items before this one were handed out, from here or from another server's stream
        #: of a fanned-out stream (a lost server's batch, asked again of this one)
        self._floor = 0
        #: slot batches dropped because the reader was past them (:meth:`pass_to`,
        #: :meth:`drop_passed`): if one is made again after its worker died, its first
        #: making came and its slot was freed then (only copies of a batch asked of two
        #: servers get here: a few, after a server was lost)
        self._passed_slots: set[int] = set()

    def put(self, msg: Any, arrays: list[Any]) -> None:
        generation = getattr(msg, "generation", -1)
        if generation not in (-1, self.generation):
            return  # planned before a reseed: void
        if isinstance(msg, proto.Error) and msg.seq < 0:
            self._failure = self._failure or (msg, arrays)  # the whole stream failed
            return
        if msg.seq < self._taken or msg.seq < self._floor:
            return  # a recomputed duplicate of an item already handed out: dropped (its slot too)
        if isinstance(msg, proto.EndOfStream):
            self.end, self.final_rng = msg.seq, msg.final_rng
        self._items.setdefault(msg.seq, (msg, arrays))  # a recomputed duplicate is dropped

    def duplicate(self, msg: Any) -> bool:
        """Whether ``msg`` repeats an item of this generation that arrived already (a batch
        made again after a worker died). Its shared-memory slot is the first copy's: the
        caller must not map it (dropping the copy's views would free the slot under the
        first copy, which the user may hold)."""
        if getattr(msg, "generation", -1) != self.generation:
            return False
        return msg.seq < self._taken or msg.seq in self._items

    def pass_to(self, seq: int) -> list[tuple[int, int]]:
        """Items before ``seq`` were handed out, some from another stream: those waiting
        here are dropped (their slots freed), and those that come later too. Returns
        ``(seq, slot)`` of the dropped batches made again after their worker died whose
        first making had not come: the caller frees ``slot`` (:meth:`SlotPool.free_superseded`)."""
        superseded: list[tuple[int, int]] = []
        if seq > self._floor:
            self._floor = seq
            for s in [s for s in self._items if s < seq]:
                msg, _ = self._items.pop(s)
                if isinstance(msg, proto.Batch) and msg.slot >= 0:
                    self._passed_slots.add(s)
                elif isinstance(msg, proto.Batch) and msg.supersedes >= 0:
                    superseded.append((s, msg.supersedes))
        return superseded

    def drop_passed(self, msg: Any) -> bool:
        """Whether batch ``msg`` arrived after the reader passed it (:meth:`passed`), to be
        dropped; a slot batch is noted (see :meth:`first_making_passed`)."""
        if not self.passed(msg.seq):
            return False
        if msg.slot >= 0:
            self._passed_slots.add(msg.seq)
        return True

    def first_making_passed(self, seq: int) -> bool:
        """Whether the first making of batch ``seq`` came into its slot and was dropped as
        passed (its slot freed then); answers once."""
        if seq in self._passed_slots:
            self._passed_slots.discard(seq)
            return True
        return False

    def passed(self, seq: int) -> bool:
        """Whether the reader of a fanned-out stream is past item ``seq``: a copy of it
        arriving here is not needed (nor its shared-memory slot, always its own since 1.4:
        a batch made again comes as frames)."""
        return seq < self._floor

    def has(self, seq: int) -> bool:
        """Whether :meth:`take` would return something now."""
        return seq in self._items or self._failure is not None

    def holds(self, seq: int) -> bool:
        """Whether item ``seq`` itself arrived (not counting a failure of the stream)."""
        return seq in self._items

    def take(self, seq: int) -> tuple[Any, list[Any]] | None:
        """Item ``seq`` if it arrived; else the stream's failure, if it has one."""
        item = self._items.pop(seq, None)
        if item is None:
            return self._failure
        self._taken = max(self._taken, seq + 1)
        return item

    def reset(self, generation: int, from_seq: int) -> list[int]:
        """Items from ``from_seq`` on are void (replanned as ``generation``): drops those
        that arrived and returns the sequence numbers of the batches among them, with those
        already taken from here (batch ``from_seq``, whose RNG told the reader its caller
        had drawn). Not an end of stream's: the server that reaches the new end tells it."""
        self.generation = generation
        end = self.end if self.end is not None and self.end >= from_seq else None
        void = sorted(
            {s for s in self._items if s >= from_seq and s != end}.union(range(from_seq, self._taken))
        )
        self._taken = min(self._taken, from_seq)  # replanned from there: sent again
        self._floor = min(self._floor, from_seq)
        self._passed_slots = {s for s in self._passed_slots if s < from_seq}  # of the old plan
        if end is not None:
            self.end = self.final_rng = None
        for seq in [s for s in self._items if s >= from_seq]:
            del self._items[seq]
        return void

    def copy_out(self) -> int:
        """Replace the shared-memory views of the batches waiting here with copies, so their
        slots are freed (once the views are collected) while the batches wait their turn;
        returns how many were copied."""
        copied = 0
        for seq, (msg, arrays) in list(self._items.items()):
            if isinstance(msg, proto.Batch) and msg.slot >= 0 and arrays:
                # no longer in a slot: a batch is copied once
                self._items[seq] = (dataclasses.replace(msg, slot=-1, layout=[]), [a.copy() for a in arrays])
                copied += 1
        return copied

    def __len__(self) -> int:
        return len(self._items)


class Connection(Protocol):
    def open_stream(
        self,
        source: dict[str, Any],
        plan: dict[str, Any],
        plan_arrays: Any,
        batch_size: int,
        include_indices: bool,
        fields: list[str] | None,
        credit_batches: int,
        credit_bytes: int,
        transforms: list[dict[str, Any]] | None = None,
        transform_seed: int = 0,
        start_credit: int = -1,
    ) -> int: ...
    def next_item(self, stream_id: int, seq: int) -> tuple[Any, list[Any]]: ...
    def ready(self, stream_id: int, seq: int) -> bool: ...
    def pool(self, stream_id: int) -> SlotPool | None: ...
    def short_of_slots(self, stream_id: int) -> bool: ...
    def send_credit(self, stream_id: int, batches: int, consumed: int, freed: list[int] = ...) -> None: ...
    def reseed(self, stream_id: int, from_seq: int, generation: int, rng: dict[str, Any]) -> None: ...
    def close_stream(self, stream_id: int) -> None: ...
    def stream_end_state(self, stream_id: int) -> tuple[int, dict[str, Any] | None] | None: ...


def iterate(
    conn: Connection,
    source: dict[str, Any],
    plan: dict[str, Any],
    plan_arrays: list[Any],
    batch_size: int,
    *,
    rng: np.random.RandomState | None,
    include_indices: bool = False,
    fields: list[str] | None = None,
    prefetch: int = 32,
    prefetch_bytes: int = 128 << 20,
    transforms: list[dict[str, Any]] | None = None,
    transform_seed: int | None = 0,
) -> Any:
    """Yield a stream's batches (tuples of arrays, or what the stream's transforms return)
    in order; see the module docstring. ``transform_seed=None``: a fresh random seed.

    A connection with an ``ahead`` (:class:`batchup_client.ahead.Ahead`) opens the next
    epoch's stream as soon as this one's end is known, when the same arguments came before
    (a training loop), and a later call takes that stream over (see that module)."""
    expected = rng.get_state() if rng is not None else None

    def open_stream(state: Any, start_credit: int = -1) -> int:
        seed = secrets.randbits(63) if transform_seed is None else transform_seed
        wire = plan if state is None else {**plan, "rng": proto.encode_rng_state(state)}
        return conn.open_stream(
            source,
            wire,
            plan_arrays,
            batch_size,
            include_indices,
            fields,
            prefetch,
            prefetch_bytes,
            transforms,
            seed,
            start_credit=start_credit,
        )

    ahead: Ahead | None = getattr(conn, "ahead", None)
    key: tuple[Any, ...] | None = None
    if ahead is not None and rng is not np.random.mtrand._rand:  # the global RNG: others draw from it
        key = (
            repr(source),
            repr(plan),
            batch_size,
            include_indices,
            repr(fields),
            prefetch,
            prefetch_bytes,
            repr(transforms),
            transform_seed,
            rng is None,
        )
    opened = ahead.take(key, plan_arrays) if ahead is not None and key is not None else None
    if opened is not None and ahead is not None:
        if rng is None or proto.states_equal(opened.state, expected):
            ahead.taken_over(key)
        else:  # the caller's RNG moved on since that stream was planned
            ahead.unused(key)
            conn.close_stream(opened.stream_id)
            opened = None
    sid = opened.stream_id if opened is not None else open_stream(expected)
    #: open the next epoch's stream once this one's end is known (a loop that repeats), of
    #: a server that can (1.6: it tells the final RNG state and takes a start credit)
    look_ahead = (
        ahead is not None
        and key is not None
        and ahead.repeats(key)
        and ahead.kept > 0
        and getattr(conn, "opens_ahead", True)
    )
    grant_every = max(1, prefetch // 4)
    consumed = granted = generation = 0
    unreported = biggest = 0  # bytes of the batches consumed since the last report; the largest
    pool = conn.pool(sid)
    if pool is not None:  # freed slots return the credit: a quarter of the pool at a time
        grant_every = max(1, min(prefetch, pool.slots) // 4)
    framed = 0  # batches of a pool stream that came as frames (their credit is not a slot)
    try:
        if opened is not None and opened.held:  # the rest of its credit, held while unread
            conn.send_credit(sid, opened.held, 0)
        while True:
            if pool is not None:  # credit comes back as slots are freed, not as batches are read
                returned = pool.freed_count() + framed
                # about to wait: hand slots back only when the server may be short of them
                # (conn.next_item also does, after a wait in vain): one message less per batch
                waiting = returned and not conn.ready(sid, consumed)
                if returned >= grant_every or (waiting and (framed or conn.short_of_slots(sid))):
                    freed = pool.take_freed()
                    conn.send_credit(sid, len(freed) + framed, consumed, freed)
                    framed = 0
            elif (
                consumed > granted
                and not conn.ready(sid, consumed)
                and (transforms or 2 * (unreported + biggest) > prefetch_bytes)
            ):
                # About to wait. The server can make the awaited batch (its batch credit
                # runs grant_every ahead of the last report) unless its byte budget holds
                # it back: report the consumed batches first when it may (within 2x, for
                # how the server counts a batch's bytes; a transform's output tells
                # nothing of it), or a budget below grant_every batches never frees. A
                # report before every wait cut the server's work into tasks of 1-2 batches.
                conn.send_credit(sid, consumed - granted, consumed)
                granted, unreported = consumed, 0
            msg, arrays = conn.next_item(sid, consumed)
            if look_ahead:
                end = conn.stream_end_state(sid)
                if end is not None:
                    look_ahead = False
                    start = min(prefetch, grant_every)  # a quarter of what flies
                    _open_ahead(conn, ahead, key, plan_arrays, rng, end[1], open_stream, start, prefetch)  # type: ignore[arg-type]
            if isinstance(msg, proto.Error):
                raise remote_error(msg.code, msg.message, msg.remote_type, msg.traceback)
            if msg.rng is not None and rng is not None:
                current = rng.get_state()
                if not proto.states_equal(current, expected):
                    generation += 1
                    conn.reseed(sid, consumed, generation, proto.encode_rng_state(current))  # type: ignore[arg-type]
                    expected = current
                    del msg, arrays  # a void batch must not pin its shared-memory slot
                    continue
                expected = proto.decode_rng_state(msg.rng)
                rng.set_state(expected)
            if isinstance(msg, proto.EndOfStream):
                return
            consumed += 1
            if pool is None:
                size = sum(a.nbytes for a in arrays)
                unreported += size
                if size > biggest:  # a quarter of the batches the byte budget lets fly
                    biggest = size
                    grant_every = max(1, min(prefetch, prefetch_bytes // size) // 4)
                if consumed - granted >= grant_every:
                    conn.send_credit(sid, consumed - granted, consumed)
                    granted, unreported = consumed, 0
            elif msg.slot < 0 and msg.supersedes < 0:
                framed += 1  # (a batch made again returns its credit as the slot it supersedes)
            container = msg.container
            batch: Any = pool.hand_out(arrays, prefetch) if pool is not None else tuple(arrays)
            del msg, arrays  # hold no view of a slot while the user has the batch
            if container:
                batch = _contained(container, batch)
            yield batch
            del batch
    finally:
        conn.close_stream(sid)  # freed slots not reported stay in the pool for its next stream


def _open_ahead(
    conn: Connection,
    ahead: Ahead,
    key: tuple[Any, ...],
    plan_arrays: list[Any],
    rng: np.random.RandomState | None,
    final_rng: dict[str, Any] | None,
    open_stream: Any,
    start: int,
    prefetch: int,
) -> None:
    """Open the next epoch's stream from the RNG state this one ends at (not when a
    shuffled stream's server does not tell it, before 1.6), allowed to make only ``start``
    of its ``prefetch`` batches until it is taken over; a failure only logs.

    A stream that came with a slot pool gets the rest at once: its pool bounds what it
    makes (and is there anyway), and an interleaved A/B of CIFAR-shaped epochs through
    shared memory made 2 % more batches per second so than with a quarter. One whose
    batches come as frames keeps to the quarter, so an unused one holds that much of the
    client's memory, not a whole window (the server may have had no pool for it, too)."""
    if rng is not None and final_rng is None:
        return
    state = proto.decode_rng_state(final_rng) if final_rng is not None else None
    try:
        sid = open_stream(state, start if start < prefetch else -1)
    except BatchupError as exc:  # the stream the caller reads goes on; the next opens as usual
        log.debug("could not open the next epoch's stream ahead: %s", exc)
        return
    held = prefetch - start
    if held and conn.pool(sid) is not None:
        conn.send_credit(sid, held, 0)
        held = 0
    # a copy: the caller may change its index arrays in place before the next epoch
    copies = [np.array(a, copy=True) for a in plan_arrays]
    for stale in ahead.keep(Opened(key, copies, sid, state, held)):
        conn.close_stream(stale)


class _Lease:
    """Owner of one slot's arrays: when the last view is gone, the slot is free again."""

    __slots__ = ("__weakref__", "pool", "state")

    def __init__(self, pool: SlotPool, state: list[Any]):
        self.pool = pool  # keeps the mapping alive as long as any view is
        self.state = state  # [slot, handed_out]


class SlotPool:
    """A pool of shared-memory slots, mapped into this process (one stream at a time uses it;
    later streams of the same client and geometry reuse it, so its pages stay warm).

    Batches are views of a slot; a slot is reported free only when every view of its
    batch has been garbage collected, so a batch the user keeps never changes under them.
    When the user holds all but one slot, further batches are copied out of their slot
    (never blocking), so at least one slot keeps circulating.
    """

    def __init__(self, path: str, slots: int, slot_bytes: int):
        import mmap

        self.path = path
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), slots * slot_bytes)
        self._address = np.frombuffer(self.map, dtype=np.uint8).ctypes.data  # fixed while mapped
        self.slots, self.slot_bytes = slots, slot_bytes
        self._freed: collections.deque[int] = collections.deque()
        self._superseded: set[tuple[int, int, int]] = set()  #: (stream, seq, slot) freed as superseded
        self.handed = 0  #: slots whose batch the user holds right now
        self.copied = 0  #: batches copied out because the user held too many slots

    def _release(self, state: list[Any]) -> None:  # runs when a lease is collected
        if state[1]:
            self.handed -= 1
        self._freed.append(state[0])

    def arrays(self, slot: int, layout: Any) -> list[np.ndarray[Any, Any]]:
        if not 0 <= slot < self.slots:
            raise proto.MalformedFrame(f"slot {slot} is outside the pool of {self.slots}")
        state: list[Any] = [slot, False]
        lease = _Lease(self, state)
        weakref.finalize(lease, self._release, state)
        return proto.arrays.arrays_in_slot(
            self.map, slot * self.slot_bytes, layout, self.slot_bytes, lease, self._address
        )

    def hand_out(self, arrays: list[np.ndarray[Any, Any]], credit: int | None = None) -> tuple[Any, ...]:
        """The batch for the user: the slot's views, or copies when slots run short, or
        when the user would hold all but one of the stream's ``credit`` batches (on a pool
        stream credit comes back only with freed slots)."""
        lease = next((o for o in map(proto.arrays.slot_owner, arrays) if o is not None), None)
        if not isinstance(lease, _Lease):
            return tuple(arrays)
        if self.handed + 1 > min(self.slots, credit or self.slots) - 1:
            self.copied += 1
            return tuple(a.copy() for a in arrays)  # the views die with `arrays`: slot freed
        lease.state[1] = True
        self.handed += 1
        return tuple(arrays)

    def free_unused(self, slot: int) -> None:
        """A batch was written into ``slot`` but will never be handed out (closed stream)."""
        if 0 <= slot < self.slots:
            self._freed.append(slot)

    def free_superseded(self, stream_id: int, seq: int, slot: int) -> None:
        """Batch ``seq`` of a stream was made again after its worker died and taken in place
        of its first making, which was to fill ``slot`` and never came: ``slot`` is free. If
        that first making comes after all, :meth:`late_first_making` says so (once)."""
        self.free_unused(slot)
        self._superseded.add((stream_id, seq, slot))

    def late_first_making(self, stream_id: int, seq: int, slot: int) -> bool:
        """Whether a slot batch is the late first making of a batch whose slot was freed as
        superseded (:meth:`free_superseded`): to drop unread, its slot not freed twice."""
        key = (stream_id, seq, slot)
        if key in self._superseded:
            self._superseded.discard(key)
            return True
        return False

    def freed_count(self) -> int:
        """Slots freed and not yet reported to the server."""
        return len(self._freed)

    def take_freed(self) -> list[int]:
        out = []
        while self._freed:
            out.append(self._freed.popleft())
        return out


def admit_batch(msg: Any, inbox: Inbox | None, pool: SlotPool | None, closed: bool) -> bool:
    """Whether a :class:`~batchup_protocol.Batch` that came goes into its stream's inbox
    (a slot batch's views are then mapped); frees, or keeps, the slots of those that do not.
    ``closed``: the stream was closed here (its late batches are dropped).

    * A batch made again after its worker died (``supersedes``, 1.4) is dropped when its
      first making came: the user may hold that one. If the reader is past it (fanned
      out: it took another server's copy), the superseded slot is freed unless its first
      making came (and was freed as passed); a first making that comes later is dropped
      without freeing its slot twice (:meth:`SlotPool.late_first_making`).
    * A slot batch whose stream is closed, or that the reader passed, frees its slot.
    Raises :class:`proto.ProtocolError` for a slot batch of a stream with no pool."""
    if msg.supersedes >= 0:
        if inbox is None or inbox.duplicate(msg) or msg.generation != inbox.generation:
            return False  # a closed stream, or a replanned generation, cannot tell: slot kept
        if inbox.drop_passed(msg):
            if pool is not None and not inbox.first_making_passed(msg.seq):
                pool.free_superseded(msg.stream_id, msg.seq, msg.supersedes)
            return False
    if msg.slot < 0:
        return inbox is not None
    if pool is None:
        if inbox is None and closed:
            return False  # a late batch of a closed stream whose pool the server removed since
        raise proto.MalformedFrame(f"a slot batch for stream {msg.stream_id}, which has no pool")
    if pool.late_first_making(msg.stream_id, msg.seq, msg.slot):
        return False  # its slot was freed when the batch made again in its place was taken
    if inbox is None or inbox.drop_passed(msg):  # a closed stream, or another server's copy taken
        pool.free_unused(msg.slot)
        return False
    return not inbox.duplicate(msg)  # made again into the slot the first copy holds: dropped


def _contained(container: str, arrays: tuple[Any, ...]) -> Any:
    """A transform's result as it returned it (see ``Batch.container``)."""
    if container == "array" and len(arrays) == 1:
        return arrays[0]
    if container == "list":
        return list(arrays)
    if container == "none":
        return None
    raise proto.MalformedFrame(f"unknown batch container {container!r} for {len(arrays)} array(s)")
