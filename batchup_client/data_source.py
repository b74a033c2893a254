"""batchup 0.2.3's ``data_source`` API, served by a batchup-server.

Change ``from batchup import data_source`` to ``from batchup_client import data_source``
and a script runs unchanged: :class:`ArrayDataSource` hands its arrays to a server once
(the embedded local server by default, or ``$BATCHUP_SERVER``) and streams batches
from it. Batches, their dtypes and the caller's RNG state after each batch are
batchup's. Sources the wire cannot carry (array-likes that are not ndarrays, object
arrays, RNGs other than ``RandomState``) iterate in process, exactly as batchup does.
"""

from __future__ import annotations

import collections
import collections.abc
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import batchup_protocol as proto
from batchup_protocol.plan import check_batch_size, check_shard, shard_slice

from . import sampling
from .arrays import KeyCache
from .batch_map import batch_map_concat, batch_map_mean, length_of_batch
from .streaming import UnsupportedShuffle, iterate, resolve_shuffle

__all__ = [
    "AbstractDataSource",
    "ArrayDataSource",
    "CallableDataSource",
    "ChoiceBatch",
    "ChoiceDataSource",
    "CompositeDataSource",
    "IteratorDataSource",
    "MapDataSource",
    "RandomAccessDataSource",
    "batch_map_concat",
    "batch_map_mean",
    "coerce_data_source",
]

log = logging.getLogger("batchup_client")

_length_of_batch = length_of_batch


def _cut_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of every array of a (nested) batch; a choice's index batch
    keeps its child's number."""
    if isinstance(batch, ChoiceBatch):
        return ChoiceBatch(_cut_batch(batch.sample_indices, start, stop), batch.ds_index)
    if isinstance(batch, tuple):
        return tuple(_cut_batch(b, start, stop) for b in batch)
    return batch[start:stop]


def _sharded_indices(source: Any, batch_size: int, shard: tuple[int, int], **kwargs: Any) -> Iterator[Any]:
    """``source.batch_indices_iterator`` for one rank: its part of each global index batch
    (``batch_size * world_size``), cut as :func:`_shard_composed` does."""
    batch_size = check_batch_size(batch_size)
    return _shard_composed(source.batch_indices_iterator(batch_size * shard[1], **kwargs), shard)


def _shard_composed(batches: Iterator[Any], shard: tuple[int, int] | None) -> Iterator[Any]:
    """A rank's cut of each whole global batch, of data or of indices, by the rule of the
    server's ``ShardedPlan`` (composites: cut after trimming; a choice's index batch keeps
    its child); ``shard=None``: the batches as they are."""
    if shard is None:
        yield from batches
        return
    rank, world = shard
    for batch in batches:
        start, stop = shard_slice(length_of_batch(batch), rank, world)
        yield _cut_batch(batch, start, stop)


def _rebuild(batch: tuple[Any, ...], shape: Any) -> Any:
    """A composite's nested batch from its flat arrays (``shape``: see ``_tree``)."""
    arrays = iter(batch)

    def build(node: Any) -> tuple[Any, ...]:
        if isinstance(node, int):
            return tuple(next(arrays) for _ in range(node))
        flatten, children = node
        parts = tuple(build(child) for child in children)
        return sum(parts, ()) if flatten else parts

    return build(shape)


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "__getitem__") and hasattr(x, "__len__")


def plan_for(sampler: Any) -> tuple[dict[str, Any], list[Any]] | None:
    """The wire description of a batchup sampler, or ``None`` if it cannot travel."""
    name = type(sampler).__name__
    if name == "StandardSampler":
        return {"kind": "standard", "length": int(sampler.length), "repeats": int(sampler.repeats)}, []
    indices = getattr(sampler, "indices", None)
    if indices is not None and not (
        isinstance(indices, np.ndarray) and indices.ndim == 1 and indices.dtype.kind in "iu"
    ):
        return None
    if name == "SubsetSampler":
        return {"kind": "subset", "repeats": int(sampler.repeats), "indices": 0}, [indices]
    if name == "WeightedSampler":
        return {"kind": "weighted", "weights": 0}, [np.asarray(sampler.weights, dtype=np.float64)]
    if name == "WeightedSubsetSampler":
        weights = np.asarray(sampler.sub_weights)
        if weights.dtype.kind != "f":
            return None
        return {"kind": "weighted_subset", "weights": 0, "indices": 1}, [weights, indices]
    return None


def check_array_list(data: Any) -> int:
    """batchup's checks on ``ArrayDataSource`` data (same types and messages); the length."""
    if not isinstance(data, list):
        raise TypeError(f"data must be a list of array-like objects, not a {type(data)}")
    length = len(data[0])  # IndexError for [], as batchup
    for i, d in enumerate(data[1:]):
        if len(d) != length:
            raise ValueError(
                f"Arrays have inconsistent length; array 0 has length {length}, while array "
                f"{i + 1} has length {len(d)}"
            )
    return length


def _require_random_access(random_access: bool, method: str) -> None:
    """batchup's error for a random-access method on a source with a non-random-access child."""
    if not random_access:
        raise TypeError(
            f"{method} method not supported as one or more of the underlying data sources "
            "does not support random access"
        )


class _ShardPositions:
    """Passes a rank's batches through, knowing each sample's position in the global stream
    (global batch ``g`` starts at ``g * global_batch``; the rank takes its
    :func:`shard_slice` of it); ``keep()`` records the current batch's positions."""

    def __init__(self, batches: Iterator[Any], global_batch: int, total: Any, rank: int, world: int):
        self.batches, self.global_batch, self.total = batches, global_batch, total
        self.rank, self.world = rank, world
        self.current: np.ndarray[Any, Any] = np.arange(0)
        self.kept: list[np.ndarray[Any, Any]] = []

    def __iter__(self) -> Iterator[Any]:
        for g, batch in enumerate(self.batches):
            base = g * self.global_batch
            n = self.global_batch
            if self.total is not None and self.total != np.inf:
                n = min(n, int(self.total) - base)
            start, stop = shard_slice(n, self.rank, self.world)
            self.current = np.arange(base + start, base + stop)
            yield batch

    def keep(self) -> None:
        self.kept.append(self.current)

    def positions(self) -> np.ndarray[Any, Any]:
        return np.concatenate(self.kept) if self.kept else np.arange(0)


class _Counted:
    """Passes batches through, counting their samples."""

    def __init__(self, batches: Iterator[Any]):
        self.batches, self.samples = batches, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.samples += length_of_batch(batch)
            yield batch


class AbstractDataSource:
    """A source of mini-batches (batchup's base class)."""

    @property
    def is_random_access(self) -> bool:
        return False

    def num_samples(self, **kwargs: Any) -> Any:
        raise NotImplementedError

    def batch_iterator(self, batch_size: int, **kwargs: Any) -> Iterator[Any]:
        raise NotImplementedError

    def map(
        self, fn: Callable[..., Any] | str, *, seed: int | None = None, where: str = "auto", **params: Any
    ) -> MapDataSource:
        """``fn(*batch)`` for every batch (batchup's ``map``); see :class:`MapDataSource`."""
        return MapDataSource(self, fn, params, seed=seed, where=where)

    def _map_setup(
        self, batch_size: int, n_batches: int | None, kwargs: dict[str, Any]
    ) -> tuple[tuple[int, int] | None, int | None]:
        """What ``batch_map_*`` check first: the shard (rank, world size) or ``None``, and
        the batches to map (of ``batch_size * world_size`` globally, as batchup counts)."""
        check_batch_size(batch_size)  # (batchup: ZeroDivisionError for 0, nothing for -1)
        shard = check_shard(kwargs.get("rank"), kwargs.get("world_size"))
        if n_batches is None:
            n = self.num_samples(**kwargs)
            if n == np.inf:
                raise ValueError(
                    "Data set has infinite size or sampler will generate infinite samples but "
                    "no n_batches limit specified"
                )
            if n is not None:
                n_batches = sampling.num_batches(n, batch_size * (shard[1] if shard else 1))
        return shard, n_batches

    def batch_map_concat(
        self,
        func: Callable[..., Any],
        batch_size: int,
        progress_iter_func: Any = None,
        n_batches: int | None = None,
        prepend_args: tuple[Any, ...] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``batch_map_concat`` over this source's batches (kwargs go to batch_iterator).

        With ``rank=r, world_size=w`` it maps this rank's shard and returns
        ``(results, positions)``: batchup's result for those samples, and each sample's
        position in the unsharded stream, so an all-gather puts every result in place
        exactly once (no padding duplicates).
        """
        shard, n_batches = self._map_setup(batch_size, n_batches, kwargs)
        batches = self.batch_iterator(batch_size, **kwargs)
        if shard is None:
            return batch_map_concat(func, batches, progress_iter_func, n_batches, prepend_args)
        total = self.num_samples(**kwargs)
        tracker = _ShardPositions(batches, batch_size * shard[1], total, *shard)

        def tracked(*args: Any) -> Any:
            out = func(*args)
            if out is not None:
                tracker.keep()
            return out

        results = batch_map_concat(tracked, tracker, progress_iter_func, n_batches, prepend_args)
        return results, tracker.positions()

    def batch_map_mean(
        self,
        func: Callable[..., Any],
        batch_size: int,
        progress_iter_func: Any = None,
        sum_axis: Any = None,
        n_batches: int | None = None,
        prepend_args: tuple[Any, ...] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``batch_map_mean`` over this source's batches (kwargs go to batch_iterator).

        With ``rank=r, world_size=w`` it averages over this rank's shard and returns
        ``(means, n_samples)``; the global mean is ``sum(means_r * n_r) / sum(n_r)``.
        """
        shard, n_batches = self._map_setup(batch_size, n_batches, kwargs)
        batches = self.batch_iterator(batch_size, **kwargs)
        if shard is None:
            return batch_map_mean(func, batches, progress_iter_func, sum_axis, n_batches, prepend_args)
        counted = _Counted(batches)
        means = batch_map_mean(func, counted, progress_iter_func, sum_axis, n_batches, prepend_args)
        return means, counted.samples

    @staticmethod
    def _get_shuffle_rng(shuffle: Any) -> Any:
        if shuffle is False:
            return None
        if shuffle is True:
            return np.random
        return shuffle


class RandomAccessDataSource(AbstractDataSource):
    """A source whose samples can be fetched by index; batches come from ``sampler``."""

    def __init__(
        self,
        length: int,
        indices: Any = None,
        repeats: int = 1,
        sampler: Any = None,
        include_indices: bool = False,
    ):
        self.include_indices = include_indices
        if sampler is not None:
            if repeats != 1:
                raise ValueError("repeats should be 1 when sampler is provided")
            if indices is not None:
                raise ValueError("indices should be None when sampler is provided")
            self.sampler = sampler
        else:
            if repeats == 0 or repeats < -1:
                raise ValueError(f"Invalid number of repeats; should be >= 1 or -1, not {repeats}")
            if indices is None:
                self.sampler = sampling.StandardSampler(length, repeats)
            else:
                self.sampler = sampling.SubsetSampler(indices, repeats)

    @property
    def is_random_access(self) -> bool:
        return True

    def num_samples(self, **kwargs: Any) -> Any:
        return self.sampler.num_indices_generated()

    def samples_by_indices_nomapping(self, indices: Any) -> Any:
        raise NotImplementedError

    def samples_by_indices(self, indices: Any) -> Any:
        return self.samples_by_indices_nomapping(self.sampler.map_indices(indices))

    def batch_indices_iterator(
        self,
        batch_size: int,
        shuffle: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """batchup's index batches; with ``rank``/``world_size``, this rank's part of each
        global batch (the indices of that rank's :meth:`batch_iterator` batches)."""
        shard = check_shard(rank, world_size)
        if shard is not None:
            return _sharded_indices(self, batch_size, shard, shuffle=shuffle)
        rng = self._get_shuffle_rng(shuffle)
        if rng is not None:
            return self.sampler.shuffled_indices_batch_iterator(batch_size, rng)  # type: ignore[no-any-return]
        return self.sampler.in_order_indices_batch_iterator(batch_size)  # type: ignore[no-any-return]

    def _local_batches(
        self, batch_size: int, shuffle: Any, shard: tuple[int, int] | None = None
    ) -> Iterator[Any]:
        # sharded: the global index batches (batch_size * world_size), cut here by the rule
        # of the server's ShardedPlan (a subclass's batch_indices_iterator need not shard)
        world = shard[1] if shard is not None else 1
        for ndx in _shard_composed(self.batch_indices_iterator(batch_size * world, shuffle=shuffle), shard):
            yield self.samples_by_indices_nomapping(ndx)

    def batch_iterator(
        self,
        batch_size: int,
        shuffle: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        """batchup's batches, streamed by a server when they can be (:meth:`_stream`); with
        ``rank``/``world_size``, this rank's shard (:class:`batchup_protocol.plan.ShardedPlan`)."""
        shard = check_shard(rank, world_size)
        remote = self._stream(batch_size, shuffle, None, shard)
        if remote is None:
            yield from self._local_batches(batch_size, shuffle, shard)
        else:
            yield from remote

    def _stream(
        self,
        batch_size: int,
        shuffle: Any,
        maps: list[MapDataSource] | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[Any] | None:
        """Batches a server streams (``maps`` applied there), or ``None`` to batch here."""
        return None


def stream_from(
    client: Any,
    source: dict[str, Any],
    sampler: Any,
    batch_size: int,
    shuffle: Any,
    include_indices: bool,
    fields: list[str] | None = None,
    maps: list[MapDataSource] | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[Any] | None:
    """A remote batch generator for ``sampler`` over ``source``; ``None`` if it cannot travel."""
    plan = plan_for(sampler)
    if plan is None:
        return None
    if plan[0]["kind"].startswith("weighted") and resolve_shuffle(shuffle) is None:
        check_batch_size(batch_size)
        raise NotImplementedError(f"In-order sampling not supported by {type(sampler).__name__}")
    return stream_plan(client, source, plan, batch_size, shuffle, include_indices, fields, maps, shard)


def stream_plan(
    client: Any,
    source: dict[str, Any],
    plan: tuple[dict[str, Any], list[Any]],
    batch_size: int,
    shuffle: Any,
    include_indices: bool,
    fields: list[str] | None = None,
    maps: list[MapDataSource] | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[Any] | None:
    """A remote batch generator for a wire plan (see :func:`stream_from`)."""
    if shard is not None:
        plan = ({**plan[0], "shard": list(shard)}, plan[1])
    rng = resolve_shuffle(shuffle)
    batch_size = check_batch_size(batch_size)  # a numpy integer becomes an int (msgpack)
    transforms: list[dict[str, Any]] = []
    seed: int | None = 0
    if maps:
        wire = _transforms_for(client, maps)
        if wire is None:
            return None
        transforms, seed = wire
    batches, nbytes = getattr(client, "prefetch", (32, 64 << 20))
    batches = min(batches, getattr(client, "max_credit_batches", batches))  # what the server allows
    return iterate(  # type: ignore[no-any-return]
        client,
        source,
        plan[0],
        plan[1],
        batch_size,
        rng=rng,
        include_indices=include_indices,
        fields=fields,
        prefetch=batches,
        prefetch_bytes=nbytes,
        transforms=transforms,
        transform_seed=seed,
    )


def _transforms_for(client: Any, maps: list[MapDataSource]) -> tuple[list[dict[str, Any]], int | None] | None:
    """The wire transforms of ``maps`` (innermost first) and the stream's transform seed;
    ``None`` when a function must run here (the server does not trust client code)."""
    wire: list[dict[str, Any]] = []
    for m in maps:
        if isinstance(m.fn, str):
            wire.append({"name": m.fn, "params": m.params} if m.params else {"name": m.fn})
        elif m.where == "server" or getattr(client, "trusts_code", False):
            wire.append({"code": client.register_code(m.fn)})
        else:
            return None
    seeds = [m.seed for m in maps if m.seed is not None]
    return wire, (seeds[-1] if seeds else None)  # None: each stream draws a seed of its own


class ArrayDataSource(RandomAccessDataSource):
    """Mini-batches of a list of equally long arrays, streamed by a batchup-server.

    ``data`` must be a list (batchup's rule); batches are tuples of arrays
    (``(indices, X, y)`` with ``include_indices=True``).
    """

    def __init__(
        self,
        data: list[Any],
        indices: Any = None,
        repeats: int = 1,
        sampler: Any = None,
        include_indices: bool = False,
    ):
        length = check_array_list(data)
        super().__init__(
            length, indices=indices, repeats=repeats, sampler=sampler, include_indices=include_indices
        )
        self.data = data
        self._keys = KeyCache()

    def samples_by_indices_nomapping(self, indices: Any) -> Any:
        batch = tuple([d[indices] for d in self.data])
        if self.include_indices:
            if isinstance(indices, slice):
                indices = np.arange(indices.start, indices.stop, indices.step)
            return (indices,) + batch
        return batch

    def _wire_ready(self) -> bool:
        for d in self.data:
            if not isinstance(d, np.ndarray) or d.ndim == 0:
                return False
            try:
                proto.check_dtype(d.dtype)
            except TypeError:
                return False
        return True

    def _stream(
        self,
        batch_size: int,
        shuffle: Any,
        maps: list[MapDataSource] | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[Any] | None:
        """Batches streamed by a server (``maps`` applied there), or ``None``."""
        if not self._travels(shuffle):
            return None
        target = self._server_source()
        if target is None:
            return None
        client, ref, fields = target
        return stream_from(
            client, ref, self.sampler, batch_size, shuffle, self.include_indices, fields, maps, shard
        )

    def _n_arrays(self) -> int:
        return len(self.data) + (1 if self.include_indices else 0)

    def _server_target(self) -> tuple[Any, dict[str, Any], list[str] | None] | None:
        return self._server_source() if self._travels(None) else None

    def _server_source(self) -> tuple[Any, dict[str, Any], list[str] | None] | None:
        """Where the server finds this data: fields of one of its sources (datasets), or
        the client's arrays handed over once; ``None`` to batch in process."""
        from .remote import common_remote_source

        on_server = common_remote_source(self.data)
        if on_server is not None:
            return on_server
        if os.environ.get("BATCHUP_SERVER") == "inprocess" or not self._wire_ready():
            return None
        from . import default_client

        client = default_client()
        keys = client.ensure_arrays(self.data, [self._keys.key(d) for d in self.data])
        return client, {"arrays": keys}, None

    def _travels(self, shuffle: Any) -> bool:
        """Can the server draw this sampler's batches for this ``shuffle``?"""
        try:
            resolve_shuffle(shuffle)
            return plan_for(self.sampler) is not None
        except UnsupportedShuffle:
            return False


class CompositeDataSource(AbstractDataSource):
    """Several sources stepped together: batch ``i`` joins batch ``i`` of every child.

    As batchup: children get the same ``batch_iterator`` arguments (one shared RNG, drawn
    from in child order), iteration stops at the first child that runs out (earlier
    children's last batch is dropped), sub-batches are trimmed to the shortest when
    ``trim``, and flattened one level when ``flatten``.

    When every child (nested composites included) is a source one server can stream, the
    whole composite runs there as one plan: one stream, one credit window, the children's
    rows gathered side by side by the workers. Otherwise (a map or custom child, children
    on different servers, mixed trim flags) each child streams on its own and the client
    composes them; the shared RNG stays exact either way.
    """

    def __init__(self, datasets: list[Any], flatten: bool = True, trim: bool = True):
        self.datasets = datasets
        self.flatten = flatten
        self.trim = trim
        self._random_access = all(ds.is_random_access for ds in datasets)

    @property
    def is_random_access(self) -> bool:
        return self._random_access

    def _trimmed(self, batch: tuple[Any, ...]) -> Any:
        lengths = [length_of_batch(sub) for sub in batch]
        shortest = min(lengths)
        return _cut_batch(batch, 0, shortest) if shortest != max(lengths) else batch

    def _prepare_batch(self, batch: tuple[Any, ...]) -> Any:
        if self.trim:
            batch = self._trimmed(batch)
        return sum(batch, ()) if self.flatten else tuple(batch)

    def num_samples(self, **kwargs: Any) -> Any:
        return min([d.num_samples(**kwargs) for d in self.datasets])

    def batch_iterator(self, batch_size: int, **kwargs: Any) -> Iterator[Any]:
        shard = check_shard(kwargs.pop("rank", None), kwargs.pop("world_size", None))
        remote = (
            self._stream(batch_size, kwargs.get("shuffle"), None, shard)
            if set(kwargs) <= {"shuffle"}
            else None
        )
        if remote is not None:  # one plan on one server: one credit window for the whole stream
            yield from remote
            return
        if shard is not None:
            # the children's batches are trimmed to the shortest before a rank takes its
            # cut, so each rank receives whole global batches (world_size times the data)
            yield from _shard_composed(self.batch_iterator(batch_size * shard[1], **kwargs), shard)
            return
        iterators = [d.batch_iterator(batch_size, **kwargs) for d in self.datasets]
        for batch in zip(*iterators):
            yield self._prepare_batch(batch)

    def _tree(self) -> tuple[list[Any], Any, set[bool]] | None:
        """This composite as leaves (sources a server can stream), a nesting tree of array
        counts and flatten flags, and the trim flags met; ``None`` if a child cannot go."""
        leaves: list[Any] = []
        trims = {self.trim}
        nodes: list[Any] = []
        for ds in self.datasets:
            if isinstance(ds, CompositeDataSource):
                sub = ds._tree()
                if sub is None:
                    return None
                leaves += sub[0]
                nodes.append(sub[1])
                trims |= sub[2]
            elif hasattr(ds, "_server_target") and type(ds).__name__ in (
                "ArrayDataSource",
                "RemoteDataSource",
            ):
                leaves.append(ds)
                nodes.append(ds._n_arrays())
            else:
                return None
        return leaves, (self.flatten, nodes), trims

    def _flat_output(self) -> bool:
        """Whether batches are one flat tuple of arrays (what server-side maps need)."""
        return self.flatten and all(
            not isinstance(ds, CompositeDataSource) or ds._flat_output() for ds in self.datasets
        )

    def _stream(
        self,
        batch_size: int,
        shuffle: Any,
        maps: list[MapDataSource] | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[Any] | None:
        """The whole composite as one plan on the server (one stream, one credit window),
        or ``None`` when some child cannot travel (then children stream one by one)."""
        tree = self._tree()
        if tree is None or len(tree[2]) != 1 or (maps and not self._flat_output()):
            return None
        leaves, shape, trims = tree
        try:
            rng = resolve_shuffle(shuffle)
        except UnsupportedShuffle:
            return None
        children: list[dict[str, Any]] = []
        arrays: list[Any] = []
        refs: list[dict[str, Any]] = []
        client: Any = None
        for leaf in leaves:
            plan = plan_for(leaf.sampler)
            target = leaf._server_target()
            if plan is None or target is None or (plan[0]["kind"].startswith("weighted") and rng is None):
                return None
            if client is not None and target[0] is not client:
                return None
            client, ref, fields = target
            spec = dict(plan[0])
            for key in ("indices", "weights"):
                if key in spec:
                    spec[key] += len(arrays)
            arrays += plan[1]
            children.append(spec)
            refs.append({"source": ref, "fields": fields, "include_indices": bool(leaf.include_indices)})
        plan_spec = {"kind": "composite", "trim": trims.pop(), "children": children}
        flat = stream_plan(
            client, {"composite": refs}, (plan_spec, arrays), batch_size, shuffle, False, None, maps, shard
        )
        if flat is None or maps:
            return flat
        return (_rebuild(batch, shape) for batch in flat)

    def _check_indices(self, indices: Any, method: str) -> None:
        _require_random_access(self._random_access, method)
        if len(indices) != len(self.datasets):
            raise ValueError(
                f"length mis-match: indices has {len(indices)} items, self has "
                f"{len(self.datasets)} data sources, should be equal"
            )

    def samples_by_indices_nomapping(self, indices: Any) -> Any:
        self._check_indices(indices, "samples_by_indices_nomapping")
        return self._prepare_batch(
            tuple(ds.samples_by_indices_nomapping(ndx) for ds, ndx in zip(self.datasets, indices))
        )

    def samples_by_indices(self, indices: Any) -> Any:
        self._check_indices(indices, "samples_by_indices")
        return self._prepare_batch(
            tuple(ds.samples_by_indices(ndx) for ds, ndx in zip(self.datasets, indices))
        )

    def batch_indices_iterator(self, batch_size: int, **kwargs: Any) -> Iterator[Any]:
        _require_random_access(self._random_access, "batch_indices_iterator")
        shard = check_shard(kwargs.pop("rank", None), kwargs.pop("world_size", None))
        if shard is not None:  # cut the trimmed global batches, every child alike
            yield from _sharded_indices(self, batch_size, shard, **kwargs)
            return
        iterators = [d.batch_indices_iterator(batch_size, **kwargs) for d in self.datasets]
        for batch in zip(*iterators):
            yield self._trimmed(batch)  # index batches: always trimmed, never flattened


ChoiceBatch = collections.namedtuple("ChoiceBatch", ["sample_indices", "ds_index"])


class ChoiceDataSource(AbstractDataSource):
    """Each mini-batch comes whole from one child, chosen as batchup 0.2.3 chooses.

    Stratified with finite children: every child's batches once, in a fixed interleave
    (in order) or one ``rng.shuffle`` of the child sequence (shuffled), drawn before any
    child draws. Otherwise rounds over the children, in order or in an
    ``rng.permutation`` per round, stopping at the first child that runs out.
    """

    def __init__(self, datasets: list[Any], stratified: bool = False):
        self.datasets = datasets
        self.stratified = stratified
        self._random_access = all(ds.is_random_access for ds in datasets)

    @property
    def is_random_access(self) -> bool:
        return self._random_access

    def num_samples(self, **kwargs: Any) -> Any:
        return sum(n if n is not None else 0 for n in (d.num_samples(**kwargs) for d in self.datasets))

    def batch_iterator(self, batch_size: int, shuffle: Any = None, **kwargs: Any) -> Iterator[Any]:
        shard = check_shard(kwargs.pop("rank", None), kwargs.pop("world_size", None))
        if shard is not None:  # the choice sequence counts global batches: cut whole ones
            yield from _shard_composed(self.batch_iterator(batch_size * shard[1], shuffle, **kwargs), shard)
            return
        iterators = [d.batch_iterator(batch_size, shuffle=shuffle, **kwargs) for d in self.datasets]
        rng = self._get_shuffle_rng(shuffle)
        for batch, _ in self._ds_iterator(batch_size, iterators, rng, **kwargs):
            yield batch

    def _choose(self, indices: Any, method: str) -> tuple[Any, Any]:
        _require_random_access(self._random_access, method)
        if not isinstance(indices, ChoiceBatch):
            raise TypeError(f"indices should be a _ChoiceBatch, not a {type(indices)}")
        return self.datasets[indices.ds_index], indices.sample_indices

    def samples_by_indices_nomapping(self, indices: Any) -> Any:
        ds, sample_indices = self._choose(indices, "samples_by_indices_nomapping")
        return ds.samples_by_indices_nomapping(sample_indices)

    def samples_by_indices(self, indices: Any) -> Any:
        ds, sample_indices = self._choose(indices, "samples_by_indices")
        return ds.samples_by_indices(sample_indices)

    def batch_indices_iterator(self, batch_size: int, shuffle: Any = None, **kwargs: Any) -> Iterator[Any]:
        _require_random_access(self._random_access, "batch_indices_iterator")
        shard = check_shard(kwargs.pop("rank", None), kwargs.pop("world_size", None))
        if shard is not None:  # the choice sequence counts global batches: cut whole ones
            return _sharded_indices(self, batch_size, shard, shuffle=shuffle, **kwargs)
        rng = self._get_shuffle_rng(shuffle)
        iterators = [d.batch_indices_iterator(batch_size, shuffle=rng, **kwargs) for d in self.datasets]
        return self._ds_iterator(batch_size, iterators, rng, **kwargs)

    def _ds_iterator(self, batch_size: int, iterators: list[Any], rng: Any, **kwargs: Any) -> Iterator[Any]:
        counts = [d.num_samples(shuffle=rng, **kwargs) for d in self.datasets]
        if self.stratified and not (np.array(counts) == np.inf).any():
            per_ds = [sampling.num_batches(n, batch_size) for n in counts]
            if rng:
                order = self._ds_indices_stratified_shuffled(per_ds, rng)
            else:
                order = self._ds_indices_stratified_in_order(per_ds)
            for ds_i in order:
                yield ChoiceBatch(sample_indices=next(iterators[ds_i]), ds_index=ds_i)
            return
        while True:
            round_order = rng.permutation(len(iterators)) if rng is not None else range(len(iterators))
            for ds_i in round_order:
                try:
                    batch = next(iterators[ds_i])
                except StopIteration:
                    return
                yield ChoiceBatch(sample_indices=batch, ds_index=ds_i)

    @staticmethod
    def _ds_indices_stratified_in_order(batches_per_ds: list[int]) -> np.ndarray[Any, Any]:
        """Spread each child's batches evenly: child i appears when floor(k * b_i / max_b) steps up."""
        counts = np.array(batches_per_ds)
        max_b = counts.max()
        eps = 0.25 / max_b
        step = counts.astype(float) / max_b
        position = np.zeros_like(step)
        previous = np.full(counts.shape, -1, dtype=int)
        ds = np.arange(len(counts))
        picks = []
        for _ in range(max_b):
            level = np.floor(position + eps).astype(int)
            picks.append(ds[level > previous])
            previous = level
            position += step
        return np.concatenate(picks, axis=0)

    @staticmethod
    def _ds_indices_stratified_shuffled(batches_per_ds: list[int], rng: Any) -> np.ndarray[Any, Any]:
        """Each child's index once per batch it has, in one ``rng.shuffle``d order."""
        order = np.repeat(np.arange(len(batches_per_ds)), batches_per_ds).astype(int)
        rng.shuffle(order)
        return order  # type: ignore[no-any-return]


class CallableDataSource(AbstractDataSource):
    """Batches from ``batch_iterator_fn(batch_size, **kwargs)``; runs in this process."""

    def __init__(self, batch_iterator_fn: Callable[..., Any], num_samples_fn: Any = None):
        if (
            num_samples_fn is not None
            and not callable(num_samples_fn)
            and not (isinstance(num_samples_fn, int) and not isinstance(num_samples_fn, bool))
            and not num_samples_fn == np.inf
        ):
            raise TypeError(
                f"num_samples_fn should be None, a callable, an int, or np.inf, not {num_samples_fn}"
            )
        self.batch_iterator_fn = batch_iterator_fn
        self.num_samples_fn = num_samples_fn

    def num_samples(self, **kwargs: Any) -> Any:
        if self.num_samples_fn is None:
            return None
        if callable(self.num_samples_fn):
            return self.num_samples_fn(**kwargs)
        return self.num_samples_fn

    def batch_iterator(self, batch_size: int, **kwargs: Any) -> Iterator[Any]:
        return self.batch_iterator_fn(batch_size, **kwargs)  # type: ignore[no-any-return]


class IteratorDataSource(AbstractDataSource):
    """Batches from an existing iterator; ``batch_iterator`` returns it as is."""

    def __init__(self, batch_iter: Iterator[Any], n_samples: Any = None):
        if (
            n_samples is not None
            and not (isinstance(n_samples, int) and not isinstance(n_samples, bool))
            and not n_samples == np.inf
        ):
            raise TypeError(f"n_samples should be None, an int, or np.inf, not {n_samples}")
        self.batch_iter = batch_iter
        self.n_samples = n_samples

    def num_samples(self, **kwargs: Any) -> Any:
        return self.n_samples

    def batch_iterator(self, batch_size: int, **kwargs: Any) -> Iterator[Any]:
        return self.batch_iter


class MapDataSource(AbstractDataSource):
    """``fn(*batch)`` for every batch of ``source`` (batchup's ``MapDataSource``).

    When ``source`` streams from a server, ``fn`` runs in the server's worker processes
    (``where="auto"``) if the server trusts this client's code (the embedded local server
    always does; a network server started with ``--trust-client-code``): ``fn`` is shipped
    once with cloudpickle. Otherwise it runs here, as in batchup. ``where="server"``
    requires the server (an error if it refuses), ``where="client"`` keeps it here.

    ``fn`` may also name a transform registered by a server plugin, with ``params``
    (``ds.map("crop_flip", pad=4)``); that needs no trust, only the plugin.

    On the server, numpy's global RNG and ``random`` are seeded for each batch from
    ``(seed, batch number)`` before ``fn`` runs: random augmentations do not depend on
    which worker runs a batch. ``seed=None`` picks a fresh seed per iterator.
    """

    def __init__(
        self,
        source: AbstractDataSource,
        fn: Callable[..., Any] | str,
        params: dict[str, Any] | None = None,
        *,
        seed: int | None = None,
        where: str = "auto",
    ):
        if where not in ("auto", "server", "client"):
            raise ValueError(f"where should be 'auto', 'server' or 'client', got {where!r}")
        if isinstance(fn, str) and where == "client":
            raise ValueError(f"transform {fn!r} is a server plugin's: it cannot run in the client")
        if params and not isinstance(fn, str):
            raise TypeError("params are for named (plugin) transforms; bind a function's arguments yourself")
        self.source = source
        self.fn = fn
        self.params = dict(params or {})
        self.seed = seed
        self.where = where
        self._random_access = source.is_random_access

    @property
    def is_random_access(self) -> bool:
        return self._random_access

    def num_samples(self, **kwargs: Any) -> Any:
        return self.source.num_samples(**kwargs)

    def _local_fn(self) -> Callable[..., Any]:
        if isinstance(self.fn, str):
            raise ValueError(
                f"transform {self.fn!r} is a server plugin's, but this source's batches are made here "
                "(not streamed from a server): map a function instead"
            )
        return self.fn

    def samples_by_indices_nomapping(self, indices: Any) -> Any:
        _require_random_access(self._random_access, "samples_by_indices_nomapping")
        return self._local_fn()(*self.source.samples_by_indices_nomapping(indices))  # type: ignore[attr-defined]

    def samples_by_indices(self, indices: Any) -> Any:
        _require_random_access(self._random_access, "samples_by_indices")
        return self._local_fn()(*self.source.samples_by_indices(indices))  # type: ignore[attr-defined]

    def batch_indices_iterator(self, batch_size: int, **kwargs: Any) -> Iterator[Any]:
        _require_random_access(self._random_access, "batch_indices_iterator")
        return self.source.batch_indices_iterator(batch_size, **kwargs)  # type: ignore[attr-defined, no-any-return]

    def _chain(self) -> tuple[AbstractDataSource, list[MapDataSource]]:
        """The source under every map, and the maps from the innermost out."""
        maps: list[MapDataSource] = [self]
        base = self.source
        while isinstance(base, MapDataSource):
            maps.insert(0, base)
            base = base.source
        return base, maps

    def batch_iterator(self, batch_size: int, **kwargs: Any) -> Iterator[Any]:
        base, maps = self._chain()
        remote = None
        if all(m.where != "client" for m in maps) and hasattr(base, "_stream"):
            shard = check_shard(kwargs.get("rank"), kwargs.get("world_size"))
            remote = base._stream(batch_size, kwargs.get("shuffle"), maps, shard)
        if remote is not None:
            yield from remote
            return
        if any(m.where == "server" for m in maps):
            raise ValueError("where='server', but this source's batches are not streamed from a server")
        fn = self._local_fn()
        for batch in self.source.batch_iterator(batch_size, **kwargs):
            yield fn(*batch)


def coerce_data_source(x: Any) -> AbstractDataSource:
    """A data source from ``x`` (a source, a sequence of arrays, an iterator or a callable)."""
    if isinstance(x, AbstractDataSource):
        return x
    if isinstance(x, (list, tuple)):
        items = list(x)
        for item in items:
            if not _is_array_like(item):
                raise TypeError(
                    "Cannot convert x to a data source; x is a sequence and one of the elements "
                    f"is not an array-like object, rather a {type(item)}"
                )
        if len(items) == 0:
            raise ValueError("Cannot convert x to a data source; x is an empty sequence")
        return ArrayDataSource(items)
    if isinstance(x, collections.abc.Iterator):
        return IteratorDataSource(x)
    if callable(x):
        return CallableDataSource(x)
    raise TypeError(
        f"Cannot convert x to a data source; can only handle iterators, callables, "
        f"non-empty sequences of array-like objects; cannot handle {type(x)}"
    )
