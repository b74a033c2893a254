"""Stream state: a plan, its RNG, a credit window and checkpoints. Pure logic, no sockets.

The router asks a :class:`Stream` for work while its :class:`CreditWindow` allows it;
each produced batch is a :class:`Task` (indices plus the RNG state after drawing them)
or, at the end, an :class:`End`. The client returns credit as it consumes batches and
may ask to :meth:`Stream.reseed` from a batch on (RNG parity, PROTOCOL.md).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from batchup_protocol import encode_rng_state
from batchup_protocol.plan import CountingRNG, Plan, PlanState

__all__ = ["CreditWindow", "End", "FlowStatistics", "Stream", "StreamError", "Task"]


class StreamError(ValueError):
    """A client asked for something the stream's state does not allow."""


@dataclasses.dataclass(frozen=True, slots=True)
class FlowStatistics:
    credits: int
    in_flight: int
    in_flight_bytes: int
    max_bytes: int


class CreditWindow:
    """Batches and bytes in flight for one stream; never beyond what the client granted.

    A batch is in flight from when it is produced until the client reports it consumed.
    One batch is always allowed when nothing is in flight, so a batch larger than the
    byte budget still flows (one at a time).
    """

    def __init__(self, batches: int, max_bytes: int):
        if batches < 1 or max_bytes < 1:
            raise StreamError(
                f"credit should be >= 1 batch and >= 1 byte, got {batches} batches, {max_bytes} bytes"
            )
        self.credits = batches
        self.max_bytes = max_bytes
        self._sizes: dict[int, int] = {}
        self.in_flight_bytes = 0

    def allows(self, nbytes: int) -> bool:
        if self.credits <= 0:
            return False
        return not self._sizes or self.in_flight_bytes + nbytes <= self.max_bytes

    def take(self, seq: int, nbytes: int) -> None:
        self.credits -= 1
        self._sizes[seq] = nbytes
        self.in_flight_bytes += nbytes

    def grant(self, batches: int) -> None:
        self.credits += batches

    def in_flight(self) -> list[int]:
        """The batches produced and not yet reported consumed."""
        return list(self._sizes)

    def release_below(self, seq: int) -> None:
        """Batches before ``seq`` were consumed: their bytes are free again."""
        for s in [s for s in self._sizes if s < seq]:
            self.in_flight_bytes -= self._sizes.pop(s)

    def cancel_from(self, seq: int) -> None:
        """Batches from ``seq`` on will never be consumed: return their credit and bytes."""
        for s in [s for s in self._sizes if s >= seq]:
            self.in_flight_bytes -= self._sizes.pop(s)
            self.credits += 1

    def statistics(self) -> FlowStatistics:
        return FlowStatistics(self.credits, len(self._sizes), self.in_flight_bytes, self.max_bytes)


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """One batch to gather: rows ``indices`` of the stream's source."""

    seq: int
    generation: int
    indices: np.ndarray[Any, Any]
    rng: dict[str, Any] | None
    slot: int = -1  #: the shared-memory slot to fill, -1 when the batch goes as frames
    splits: tuple[int, ...] | None = None  #: composites: rows of each child, in ``indices`` order
    supersedes: int = -1  #: made again after its worker died: the slot its first making had

    def again(self) -> Task:
        """This task, to make again after its worker died. A first making that was to fill
        a slot may have reached the client, which may hold it, or freed it for another batch
        since: the batch is made again as frames, naming that slot (PROTOCOL.md, 1.4)."""
        if self.slot < 0:
            return self
        return dataclasses.replace(self, slot=-1, supersedes=self.slot)


def _check_state(state: Any) -> None:
    """Raise :class:`StreamError` for an RNG state numpy would refuse."""
    try:
        np.random.RandomState().set_state(state)
    except (TypeError, ValueError, OverflowError) as exc:
        raise StreamError(f"reseed rng state is invalid: {exc}") from exc


def _joined(indices: Any) -> tuple[np.ndarray[Any, Any], tuple[int, ...] | None]:
    """A composite plan's per-child index arrays as one array and the children's lengths."""
    if not isinstance(indices, list):
        return indices, None
    splits = tuple(len(i) for i in indices)
    return np.concatenate([np.asarray(i, dtype=np.int64) for i in indices]), splits


@dataclasses.dataclass(frozen=True, slots=True)
class End:
    """The plan is exhausted after ``seq`` batches."""

    seq: int
    generation: int
    rng: dict[str, Any] | None
    #: the plan's RNG state at its end (a plan with an RNG): what the caller's RNG will
    #: be once the stream is read, for the next epoch's stream
    final_rng: dict[str, Any] | None = None


class Stream:
    """One client stream over one source."""

    def __init__(
        self,
        plan: Plan,
        rng: CountingRNG | None,
        window: CreditWindow,
        row_bytes: int,
        assigned: bool = False,
        credit_batches: int = 0,
    ):
        self.plan = plan
        self.rng = rng
        self.window = window
        self.row_bytes = row_bytes
        self.next_seq = 0
        self.generation = 0
        self.consumed = 0
        self.finished = False
        self._checkpoints: dict[int, PlanState] = {}
        self.free_slots: list[int] | None = None  #: set for shared-memory streams
        # assigned mode (several servers share a stream): make only the batches the client
        # names, advancing the plan through the others or going back to a checkpoint
        self.assigned = assigned
        self._queue: collections.deque[int] = collections.deque()
        self._sent: set[int] = set()
        self._rng_at: dict[int, Any] = {}  #: RNG state before batch seq (assigned mode)
        self._pending: tuple[int, Any] | None = None  #: a reseed for a batch not reached yet
        #: (draws, state): the RNG state taken when the RNG had made ``draws`` draws. Most
        #: batches draw nothing, so their checkpoints share it instead of copying the state
        self._rng_mark: tuple[int, Any] | None = None
        self.end: int | None = None  #: the plan's length in batches, once known
        self._end_sent = False
        self._end_rng: dict[str, Any] | None = None
        #: how far past the consumed batches a client may ask (credit in flight, assigned
        #: batches): twice the stream's credit_batches, and some. A client keeps to its
        #: credit_batches; a few more come from slots freed for other streams' batches. The
        #: plan is drawn (and checkpointed) up to what is asked: without a bound, one
        #: Credit could make the router walk a plan for ever
        self.max_ahead = 2 * credit_batches + 64 if credit_batches > 0 else None

    # ------------------------------------------------------------------ assigned mode
    def assign(self, seqs: list[int]) -> None:
        """The client wants these batches from this server (assigned mode)."""
        if not self.assigned:
            raise StreamError("assign on a stream not opened with assigned=true")
        bad = [s for s in seqs if not isinstance(s, int) or s < self.consumed]
        if bad:
            raise StreamError(f"assigned batches {bad[:5]} are below the {self.consumed} consumed")
        if self.max_ahead is not None:
            far = [s for s in seqs if s >= self.consumed + self.max_ahead]
            if far or len(self._queue) + len(seqs) > self.max_ahead:
                raise StreamError(
                    f"assigned batches {far[:5] or seqs[:5]} reach too far: at most {self.max_ahead} "
                    f"batches past the {self.consumed} consumed may be asked for (twice the "
                    "stream's credit_batches, plus 64)"
                )
        self._queue.extend(seqs)
        self._awaited_first()

    def _awaited_first(self) -> None:
        """The batch the reader waits for (``seq == consumed``; a lost server's, say) is made
        before the others this server was asked for."""
        if self._queue and self._queue[0] != self.consumed and self.consumed in self._queue:
            self._queue.remove(self.consumed)
            self._queue.appendleft(self.consumed)

    def _rng_state(self) -> Any:
        if self.rng is None:
            return None
        mark = self._rng_mark
        if mark is None or mark[0] != self.rng.draws:
            mark = self._rng_mark = (self.rng.draws, self.rng.rng.get_state())
        return mark[1]

    def _set_rng(self, state: Any) -> None:
        assert self.rng is not None
        self.rng.rng.set_state(state)
        self._rng_mark = None  # the state changed without a draw

    def _final_rng(self) -> dict[str, Any] | None:
        """The RNG state at the plan's end (the plan is exhausted: it draws no more; batches
        made again after it go back to their own checkpoints and restore it)."""
        return None if self.rng is None else encode_rng_state(self.rng.rng.get_state())  # type: ignore[arg-type]

    def _advance(self) -> tuple[np.ndarray[Any, Any] | None, dict[str, Any] | None]:
        """Draw batch ``next_seq`` (checkpointing first); its indices and reported RNG."""
        seq = self.next_seq
        if self._pending is not None and self._pending[0] == seq and self.rng is not None:
            self._set_rng(self._pending[1])
            self._pending = None
        self._checkpoints[seq] = self.plan.get_state()
        if self.assigned:  # a batch may be made again later, from here
            self._rng_at[seq] = self._rng_state()
        draws = self.rng.draws if self.rng is not None else 0
        indices = self.plan.next()
        rng = None
        if self.rng is not None and self.rng.draws != draws:
            rng = encode_rng_state(self.rng.rng.get_state())  # type: ignore[arg-type]
        if indices is None:
            self.end = seq
        else:
            self.next_seq = seq + 1
        return indices, rng

    def _past_end(self, seq: int) -> bool:
        return self.end is not None and seq >= self.end

    def _produce_assigned(self) -> Task | End | None:
        seq = self._queue.popleft()
        if self.end is not None and seq >= self.end:
            if self._end_sent:
                return None
            self._end_sent = True
            return End(self.end, self.generation, self._end_rng, self._final_rng())
        if seq < self.next_seq:  # an earlier batch (another server's, lost): replay it
            here = (self.plan.get_state(), self._rng_state(), self.next_seq)
            self.plan.set_state(self._checkpoints[seq])
            if self.rng is not None:
                self._set_rng(self._rng_at[seq])
            self.next_seq = seq
            indices, rng = self._advance()
            self.plan.set_state(here[0])
            if self.rng is not None:
                self._set_rng(here[1])
            self.next_seq = here[2]
        else:
            while True:
                indices, rng = self._advance()
                if indices is None or self.next_seq > seq:
                    break
        if indices is None:
            self._end_rng = rng
            self._end_sent = True
            return End(self.end if self.end is not None else seq, self.generation, rng, self._final_rng())
        self._sent.add(seq)
        return self._task(seq, indices, rng, self._free_slot())

    def _task(self, seq: int, indices: Any, rng: dict[str, Any] | None, slot: int) -> Task:
        """The task for batch ``seq``, taking its credit."""
        indices, splits = _joined(indices)
        rows = len(indices) if splits is None else max(splits, default=0)
        self.window.take(seq, rows * self.row_bytes)
        return Task(seq, self.generation, indices, rng, slot, splits)

    def use_slots(self, free: list[int], slots: int) -> None:
        """Deliver through a pool of ``slots`` slots whose free ones are ``free`` (shared,
        since a client's pool outlives a stream): a batch needs a free slot."""
        self.free_slots = free
        self.n_slots = slots

    def _free_slot(self) -> int:
        """A free slot of the stream's pool for the next batch (its caller checked there is
        one), or -1 when batches go as frames."""
        return self.free_slots.pop() if self.free_slots is not None else -1

    def _batch_bytes(self) -> int:
        return int(getattr(self.plan, "batch_size", 1)) * self.row_bytes

    def can_produce(self) -> bool:
        if self.assigned:
            if not self._queue or self.window.credits <= 0:
                return False
            # the byte budget holds back batches the reader has not reached, not the one it
            # waits for: batches waiting at the client for it fill the budget (a lost server's);
            # with a slot pool, the slots bound what is in flight (see _bytes_allow)
            if self._queue[0] != self.consumed and not self._bytes_allow():
                return False
            # a batch needs a free slot; an end of stream does not
            return self.free_slots is None or bool(self.free_slots) or self._past_end(self._queue[0])
        if self.free_slots is not None and not self.free_slots:
            return False
        return not self.finished and self._bytes_allow()

    def _bytes_allow(self) -> bool:
        """Batch credit, and room in the byte budget. A stream with a slot pool checks only
        the credit: its pool was sized from the byte budget (at least MIN_SLOTS slots), its
        slots bound the bytes in flight, and the client reports consumed batches only as it
        frees their slots, so a byte budget below the pool's slots, or one batch larger than
        half of it, would wait for a report that never comes while the user holds a batch."""
        if self.free_slots is not None:
            return self.window.credits > 0
        return self.window.allows(self._batch_bytes())

    def produce(self) -> Task | End | None:
        """Draw the next batch's indices (the caller checked :meth:`can_produce`); ``None``
        when an assigned batch needs nothing sent (past the end, already told)."""
        if self.assigned:
            return self._produce_assigned()
        seq = self.next_seq
        indices, rng = self._advance()
        if indices is None:
            self.finished = True
            return End(seq, self.generation, rng, self._final_rng())
        return self._task(seq, indices, rng, self._free_slot())

    def credit(self, batches: int, consumed: int, freed: list[int] = ()) -> None:  # type: ignore[assignment]
        """The client consumed ``consumed`` batches in all and grants ``batches`` more.

        ``freed`` are shared-memory slots the client no longer uses.
        """
        if batches < 0 or consumed < self.consumed or (consumed > self.next_seq and not self.assigned):
            raise StreamError(
                f"credit should grant >= 0 batches and report consumed in "
                f"[{self.consumed}, {self.next_seq}], got batches={batches}, consumed={consumed}"
            )
        if freed:
            if self.free_slots is None:
                raise StreamError("freed slots on a stream without a shared-memory pool")
            bad = [
                s
                for s in freed
                if not isinstance(s, int) or s in self.free_slots or not 0 <= s < self.n_slots
            ]
            if bad:
                raise StreamError(f"freed slots {bad} are not in use")
            if len(set(freed)) != len(freed):
                raise StreamError(f"freed slots {sorted(freed)} name a slot twice")
            self.free_slots.extend(freed)
        if self.max_ahead is not None and not self.assigned:
            # credit beyond the bound is not granted: a client's count can run ahead of
            # the server's (a reseed returns the credit of void batches here, and the client
            # counts their freed slots too), which costs nothing while it is bounded. The
            # awaited batch can always be made: unmade, it has nothing in flight after it
            flying = sum(1 for s in self.window.in_flight() if s >= consumed)
            batches = max(0, min(batches, self.max_ahead - flying - self.window.credits))
        self.window.grant(batches)
        self.window.release_below(consumed)
        for s in [s for s in self._checkpoints if s < consumed]:
            del self._checkpoints[s]
            self._rng_at.pop(s, None)
        self._sent = {s for s in self._sent if s >= consumed}
        self.consumed = consumed
        if self.assigned:
            if self._queue and min(self._queue) < consumed:  # taken from another server's copy
                self._queue = collections.deque(s for s in self._queue if s >= consumed)
            self._awaited_first()

    def reseed(self, from_seq: int, generation: int, state: Any) -> None:
        """Replan from batch ``from_seq`` with a new RNG state; later batches are void.
        Nothing changes when it fails (a state numpy refuses, say)."""
        if generation <= self.generation:
            raise StreamError(f"reseed generation should exceed {self.generation}, got {generation}")
        if (
            self.assigned
            and self.rng is not None
            and from_seq >= self.next_seq
            and from_seq not in self._checkpoints
        ):
            _check_state(state)
            self._pending = (from_seq, state)  # not reached yet: applied when it is
            self.generation = generation
            return
        if from_seq not in self._checkpoints or self.rng is None:
            raise StreamError(
                f"cannot reseed from batch {from_seq}: only batches {sorted(self._checkpoints)[:1]}.."
                f"{self.next_seq} of a shuffled stream can be replanned"
            )
        _check_state(state)  # before anything changes
        self.plan.set_state(self._checkpoints[from_seq])
        self._set_rng(state)
        for s in [s for s in self._checkpoints if s > from_seq]:
            del self._checkpoints[s]
        self.window.cancel_from(from_seq)
        self.next_seq = from_seq
        self.generation = generation
        self.finished = False
        if self.assigned:  # batches already made from from_seq on are void: make them again
            for s in [s for s in self._rng_at if s > from_seq]:
                del self._rng_at[s]
            self._rng_at[from_seq] = state
            redo = sorted(s for s in self._sent if s >= from_seq)
            self._sent -= set(redo)
            self._queue.extendleft(reversed(redo))
            self.end, self._end_sent, self._pending = None, False, None
