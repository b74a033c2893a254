"""Index plans: batchup 0.2.3's samplers as checkpointable state machines.

A stream's batches are a deterministic plan: batch ``seq`` → absolute indices. The
plan draws from an RNG exactly as batchup's sampler generators do (same calls, same
order, same laziness), so both the indices and the RNG state after every batch equal
batchup's. Unlike a generator, a plan's position can be saved and restored, which is
what lets the server prefetch from a copy of the caller's RNG and rewind when the
caller touches its RNG between batches (see PROTOCOL.md, "RNG parity").
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Protocol

import numpy as np

__all__ = [
    "CompositePlan",
    "CountingRNG",
    "PlanState",
    "SequencePlan",
    "WeightedPlan",
    "ShardedPlan",
    "build_plan",
    "check_batch_size",
    "check_repeats",
    "check_shard",
    "shard_slice",
]

IntArray = np.ndarray[Any, Any]


def check_batch_size(batch_size: Any) -> int:
    """Validate a batch size (batchup itself loops forever on 0 with ``repeats != 1``)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size should be a positive integer, but got batch_size={batch_size!r}")
    size = int(batch_size)
    if size <= 0:
        raise ValueError(f"batch_size should be a positive integer, but got batch_size={batch_size!r}")
    if size >= 2**62:
        raise ValueError(f"batch_size should be below 2**62, but got batch_size={batch_size!r}")
    return size


def check_repeats(repeats: Any) -> int:
    """batchup's check, with batchup's message; and an integer (batchup loops for ever on
    1.5, and fails on "2" with a bare comparison error)."""
    if not isinstance(repeats, numbers.Integral):
        raise TypeError(f"repeats should be an integer (>= 1, or -1 for ever), not {repeats!r}")
    if repeats == 0 or repeats < -1:
        raise ValueError(f"Invalid number of repeats; should be >= 1 or -1, not {repeats}")
    return int(repeats)


class RNG(Protocol):
    def permutation(self, x: Any) -> Any: ...
    def choice(self, a: Any, size: Any = ..., replace: bool = ..., p: Any = ...) -> Any: ...


class CountingRNG:
    """Wraps a ``RandomState`` and counts draws, so callers know when its state moved."""

    __slots__ = ("draws", "rng")

    def __init__(self, rng: np.random.RandomState):
        self.rng = rng
        self.draws = 0

    def permutation(self, x: Any) -> Any:
        self.draws += 1
        return self.rng.permutation(x)

    def choice(self, a: Any, size: Any = None, replace: bool = True, p: Any = None) -> Any:
        self.draws += 1
        return self.rng.choice(a, size=size, replace=replace, p=p)

    def shuffle(self, x: Any) -> None:
        self.draws += 1
        self.rng.shuffle(x)


@dataclasses.dataclass(frozen=True, slots=True)
class PlanState:
    """A plan's position: restore it to replay from that batch on."""

    order: IntArray | None
    i: int
    left: int
    done: bool


class SequencePlan:
    """``StandardSampler`` (``indices is None``) or ``SubsetSampler``, in order or shuffled.

    Mirrors batchup's generators: the first permutation is drawn at the first batch;
    with ``repeats != 1`` batches span pass boundaries and a new permutation is drawn
    as soon as a pass is used up (including the one discarded after the last pass).
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        repeats: int = 1,
        indices: IntArray | None = None,
        rng: RNG | None = None,
    ):
        self.length = int(length) if indices is None else len(indices)
        self.batch_size = check_batch_size(batch_size)
        self.repeats = check_repeats(repeats)
        if self.repeats == -1 and self.length == 0:
            raise ValueError("an empty source with repeats=-1 yields no batch ever (batchup hangs)")
        self.indices = indices
        self.rng = rng
        self._state = PlanState(None, 0, self.repeats, False)

    def _pass_order(self) -> IntArray:
        if self.rng is None:
            return np.arange(self.length) if self.indices is None else self.indices
        if self.indices is None:
            return np.asarray(self.rng.permutation(self.length))
        return np.asarray(self.rng.permutation(self.indices))

    def get_state(self) -> PlanState:
        return self._state

    def set_state(self, state: PlanState) -> None:
        self._state = state

    def num_samples(self) -> float:
        return np.inf if self.repeats == -1 else self.length * self.repeats

    def next(self) -> IntArray | None:
        """Indices of the next batch, or ``None`` when the plan is exhausted."""
        st = self._state
        if st.done:
            return None
        order, i, left = st.order, st.i, st.left
        if order is None:
            order = self._pass_order()
        n, bs = self.length, self.batch_size
        if self.repeats == 1:
            if i >= n:
                self._state = PlanState(order, i, left, True)
                return None
            self._state = PlanState(order, i + bs, left, False)
            if self.rng is None and self.indices is None:
                return np.arange(i, min(i + bs, n))
            return order[i : i + bs]
        if i + bs <= n:
            self._state = PlanState(order, i + bs, left, False)
            if self.rng is None and self.indices is None:
                return np.arange(i, i + bs)
            return order[i : i + bs]
        out: IntArray = np.arange(0)
        while len(out) < bs:
            k = min(bs - len(out), n - i)
            out = np.append(out, order[i : i + k], axis=0)
            i += k
            if i >= n:
                order = self._pass_order()
                i -= n
                if left != -1:
                    left -= 1
                if left == 0:
                    break
        self._state = PlanState(order, i, left, left == 0)
        return out if len(out) > 0 else None


class WeightedPlan:
    """``WeightedSampler`` / ``WeightedSubsetSampler``: one ``rng.choice`` per batch, forever."""

    def __init__(
        self,
        weights: IntArray,
        batch_size: int,
        rng: RNG | None,
        indices: IntArray | None = None,
        kind: str = "WeightedSampler",
    ):
        self.weights = weights
        self.indices = indices
        self.batch_size = check_batch_size(batch_size)
        self.rng = rng
        self.kind = kind

    def get_state(self) -> PlanState:
        return PlanState(None, 0, -1, False)

    def set_state(self, state: PlanState) -> None:
        pass

    def num_samples(self) -> float:
        return np.inf

    def next(self) -> IntArray | None:
        if self.rng is None:
            raise NotImplementedError(f"In-order sampling not supported by {self.kind}")
        size = (self.batch_size,)
        if self.indices is None:
            return np.asarray(self.rng.choice(len(self.weights), size=size, p=self.weights))
        return np.asarray(self.rng.choice(self.indices, size=size, p=self.weights))


class CompositePlan:
    """batchup's ``CompositeDataSource`` over sources with plans: each batch steps every
    child in order, drawing from the one shared RNG in batchup's order (``zip`` of the
    children's generators: it stops at the first child that runs out, after the earlier
    children drew their batch), trimmed to the shortest child batch when ``trim``.
    ``next`` returns one index array per child."""

    def __init__(self, children: list[SequencePlan | WeightedPlan], trim: bool):
        self.children = children
        self.trim = trim
        self.batch_size = children[0].batch_size if children else 1

    def get_state(self) -> Any:
        return _CompositeState(tuple(c.get_state() for c in self.children))

    def set_state(self, state: Any) -> None:
        for child, s in zip(self.children, state.states):
            child.set_state(s)

    def num_samples(self) -> float:
        return min(c.num_samples() for c in self.children)

    def next(self) -> list[IntArray] | None:  # type: ignore[override]
        out = []
        for child in self.children:
            idx = child.next()
            if idx is None:
                return None
            out.append(idx)
        if self.trim:
            shortest = min(len(i) for i in out)
            out = [i[:shortest] for i in out]
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class _CompositeState:
    states: tuple[PlanState, ...]


def check_shard(rank: Any, world_size: Any) -> tuple[int, int] | None:
    """Validate ``rank`` / ``world_size`` (both or neither); ``None`` when not sharding."""
    if rank is None and world_size is None:
        return None
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(
                f"{name} should be an integer, but got {name}={v!r} (pass both rank and world_size)"
            )
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank should be in [0, world_size) and world_size >= 1, got rank={rank}, world_size={world_size}"
        )
    return int(rank), int(world_size)


def shard_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s part ``[start, stop)`` of a global batch of ``n`` samples: equal
    parts, the first ``n % world_size`` ranks one sample more (``np.array_split``'s rule)."""
    small, extra = divmod(n, world_size)
    start = rank * small + min(rank, extra)
    return start, start + small + (1 if rank < extra else 0)


class ShardedPlan:
    """Rank ``rank`` of ``world_size`` (DistributedDataParallel style): the global stream is
    ``inner``, batchup's plan with ``batch_size * world_size``; each rank takes its slice of
    every global batch (:func:`shard_slice`). All ranks get the same number of batches (the
    last may be smaller, or empty when it has fewer samples than ranks), and together see
    each sample of the global stream exactly once."""

    def __init__(self, inner: SequencePlan | WeightedPlan | CompositePlan, rank: int, world_size: int):
        self.inner = inner
        self.rank, self.world_size = rank, world_size
        self.batch_size = -(-inner.batch_size // world_size)

    def get_state(self) -> PlanState:
        return self.inner.get_state()

    def set_state(self, state: PlanState) -> None:
        self.inner.set_state(state)

    def num_samples(self) -> float:
        return self.inner.num_samples()

    def next(self) -> Any:
        idx = self.inner.next()
        if idx is None:
            return None
        if isinstance(idx, list):  # a composite: cut every child's (trimmed) part alike
            return [i[slice(*shard_slice(len(i), self.rank, self.world_size))] for i in idx]
        start, stop = shard_slice(len(idx), self.rank, self.world_size)
        return idx[start:stop]


Plan = SequencePlan | WeightedPlan | ShardedPlan | CompositePlan


def _integer(spec: dict[str, Any], name: str, default: int | None = None) -> int:
    """A plan's integer field (not a bool, string or float: msgpack keeps the type)."""
    value = spec.get(name, default) if default is not None else spec[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"plan {name} should be an integer, got {value!r:.40}")
    return value


def _attached(spec: dict[str, Any], name: str, arrays: list[IntArray], kinds: str) -> IntArray:
    """The attached array a plan field names by position: 1-D, of a dtype kind in ``kinds``."""
    pos = spec[name]
    if not isinstance(pos, int) or isinstance(pos, bool) or not 0 <= pos < len(arrays):
        raise ValueError(
            f"plan {name} should be the position of one of the {len(arrays)} attached arrays, got {pos!r:.40}"
        )
    arr = arrays[pos]
    if arr.ndim != 1 or arr.dtype.kind not in kinds:
        what = "integers" if kinds == "iu" else "numbers"
        raise ValueError(f"plan {name} should be a 1-D array of {what}, got {arr.dtype} of shape {arr.shape}")
    return arr


def build_plan(spec: dict[str, Any], batch_size: int, rng: RNG | None, arrays: list[IntArray]) -> Plan:
    """The plan described by an ``OpenStream.plan`` map (arrays: its attached frames).

    ``spec["kind"]`` is ``"standard"`` (``length``, ``repeats``), ``"subset"``
    (``repeats``; indices in ``arrays[spec["indices"]]``), ``"weighted"`` (weights in
    ``arrays[spec["weights"]]``) or ``"weighted_subset"`` (both).
    """
    shard = spec.get("shard")
    if shard is not None:
        if not isinstance(shard, list) or len(shard) != 2:
            raise ValueError(f"plan shard should be [rank, world_size], got {shard!r}")
        rank, world = check_shard(shard[0], shard[1]) or (0, 1)
        inner = build_plan({k: v for k, v in spec.items() if k != "shard"}, batch_size * world, rng, arrays)
        assert not isinstance(inner, ShardedPlan)
        return ShardedPlan(inner, rank, world)
    kind = spec.get("kind")
    if kind == "composite":
        children = spec.get("children")
        if not isinstance(children, list) or not children:
            raise ValueError("a composite plan needs a non-empty list of children")
        built = []
        for child in children:
            if not isinstance(child, dict) or child.get("kind") == "composite" or "shard" in child:
                raise ValueError("composite children should be plain plans (nest by flattening)")
            plan = build_plan(child, batch_size, rng, arrays)
            assert isinstance(plan, SequencePlan | WeightedPlan)
            built.append(plan)
        return CompositePlan(built, bool(spec.get("trim", True)))
    if kind == "standard":
        return SequencePlan(_integer(spec, "length"), batch_size, _integer(spec, "repeats", 1), None, rng)
    if kind == "subset":
        indices = _attached(spec, "indices", arrays, "iu")
        return SequencePlan(0, batch_size, _integer(spec, "repeats", 1), indices, rng)
    if kind == "weighted":
        return WeightedPlan(_attached(spec, "weights", arrays, "iuf"), batch_size, rng)
    if kind == "weighted_subset":
        weights = _attached(spec, "weights", arrays, "iuf")
        indices = _attached(spec, "indices", arrays, "iu")
        if len(weights) != len(indices):
            raise ValueError(f"plan weights ({len(weights)}) and indices ({len(indices)}) should be as long")
        return WeightedPlan(weights, batch_size, rng, indices, "WeightedSubsetSampler")
    raise ValueError(f"plan kind should be standard, subset, weighted or weighted_subset, got {kind!r}")
