"""Stream state: a plan, its RNG, a credit window and checkpoints. Pure logic, no sockets.

The router asks a :class:`Stream` for work while its :class:`CreditWindow` allows it;
each produced batch is a :class:`Task` (indices plus the RNG state after drawing them)
or, at the end, an :class:`End`. The client returns credit as it consumes batches and
may ask to :meth:`Stream.reseed` from a batch on (RNG parity, PROTOCOL.md).
"""

from __future__ import annotations

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


@dataclasses.dataclass(frozen=True, slots=True)
class End:
    """The plan is exhausted after ``seq`` batches."""

    seq: int
    generation: int
    rng: dict[str, Any] | None


class Stream:
    """One client stream over one source."""

    def __init__(
        self,
        plan: Plan,
        rng: CountingRNG | None,
        window: CreditWindow,
        row_bytes: int,
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

    def use_slots(self, free: list[int], slots: int) -> None:
        """Deliver through a pool of ``slots`` slots whose free ones are ``free`` (shared,
        since a client's pool outlives a stream): a batch needs a free slot."""
        self.free_slots = free
        self.n_slots = slots

    def _batch_bytes(self) -> int:
        return int(getattr(self.plan, "batch_size", 1)) * self.row_bytes

    def can_produce(self) -> bool:
        if self.free_slots is not None and not self.free_slots:
            return False
        return not self.finished and self.window.allows(self._batch_bytes())

    def produce(self) -> Task | End:
        """Draw the next batch's indices (the caller checked :meth:`can_produce`)."""
        seq = self.next_seq
        self._checkpoints[seq] = self.plan.get_state()
        draws = self.rng.draws if self.rng is not None else 0
        indices = self.plan.next()
        rng = None
        if self.rng is not None and self.rng.draws != draws:
            rng = encode_rng_state(self.rng.rng.get_state())  # type: ignore[arg-type]
        if indices is None:
            self.finished = True
            return End(seq, self.generation, rng)
        self.window.take(seq, len(indices) * self.row_bytes)
        self.next_seq = seq + 1
        slot = self.free_slots.pop(0) if self.free_slots is not None else -1
        return Task(seq, self.generation, indices, rng, slot)

    def credit(self, batches: int, consumed: int, freed: list[int] = ()) -> None:  # type: ignore[assignment]
        """The client consumed ``consumed`` batches in all and grants ``batches`` more.

        ``freed`` are shared-memory slots the client no longer uses.
        """
        if batches < 0 or consumed < self.consumed or consumed > self.next_seq:
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
            self.free_slots.extend(freed)
        self.window.grant(batches)
        self.window.release_below(consumed)
        for s in [s for s in self._checkpoints if s < consumed]:
            del self._checkpoints[s]
        self.consumed = consumed

    def reseed(self, from_seq: int, generation: int, state: Any) -> None:
        """Replan from batch ``from_seq`` with a new RNG state; later batches are void."""
        if generation <= self.generation:
            raise StreamError(f"reseed generation should exceed {self.generation}, got {generation}")
        if from_seq not in self._checkpoints or self.rng is None:
            raise StreamError(
                f"cannot reseed from batch {from_seq}: only batches {sorted(self._checkpoints)[:1]}.."
                f"{self.next_seq} of a shuffled stream can be replanned"
            )
        self.plan.set_state(self._checkpoints[from_seq])
        self.rng.rng.set_state(state)
        for s in [s for s in self._checkpoints if s > from_seq]:
            del self._checkpoints[s]
        self.window.cancel_from(from_seq)
        self.next_seq = from_seq
        self.generation = generation
        self.finished = False
