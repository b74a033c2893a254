"""Sources that live on the server: ``client.source("name")`` and ``client.array_source``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .data_source import RandomAccessDataSource, check_array_list, plan_for, stream_from
from .errors import TooLargeError

__all__ = ["RemoteArray", "RemoteDataSource", "SourceMethods", "common_remote_source"]


def gather_rows(
    client: Any, source: dict[str, Any], idx: np.ndarray[Any, Any], fields: list[str]
) -> list[Any]:
    """Rows ``idx`` of each field, in as many gathers as the server needs: one it finds
    larger than its ``max_message_bytes`` is asked again in halves (batchup indexes any
    number of rows at once)."""
    pieces, todo = [], [idx]
    while todo:
        part = todo.pop()
        try:
            pieces.append(client.gather(source, part, fields))
        except TooLargeError:
            if len(part) < 2:
                raise  # one row is too large: nothing to split
            half = len(part) // 2
            todo += [part[half:], part[:half]]  # (a stack: the first half is asked first)
    if len(pieces) == 1:
        return list(pieces[0])
    return [np.concatenate(columns) for columns in zip(*pieces)]


class RemoteDataSource(RandomAccessDataSource):
    """A random-access source held by a server, with batchup's API.

    ``batch_iterator`` streams batches from the server; ``samples_by_indices`` gathers
    rows there. ``fields`` picks a subset of the source's fields (all by default).
    """

    def __init__(
        self,
        client: Any,
        source: dict[str, Any],
        indices: Any = None,
        repeats: int = 1,
        sampler: Any = None,
        include_indices: bool = False,
        fields: list[str] | str | None = None,
        wait: float | None = None,
    ):
        if isinstance(fields, str):  # one field's name, not its letters
            fields = [fields]
        elif fields is not None and (
            not isinstance(fields, (list, tuple)) or not all(isinstance(f, str) for f in fields)
        ):
            raise TypeError(f"fields should be a list of field names, got {fields!r}")
        info = client.describe(source, wait)
        self.client = client
        self.source_ref = source
        self.arrays: list[Any] = []  #: the client arrays it streams, if any (``array_source``)
        self.length = info.length
        self.metadata = dict(info.metadata)
        available = [f["name"] for f in info.fields]
        if fields is not None:
            missing = [f for f in fields if f not in available]
            if missing:
                raise ValueError(
                    f"source {source.get('name')!r} has no field(s) {missing}; it has {available}"
                )
        if fields is None:
            fields = self.metadata.get("default_fields") or available
        self.fields = list(fields)
        self.field_info = {f["name"]: f for f in info.fields}
        super().__init__(
            self.length, indices=indices, repeats=repeats, sampler=sampler, include_indices=include_indices
        )

    def __len__(self) -> int:
        return int(self.length)

    def __repr__(self) -> str:
        return f"<RemoteDataSource {self.source_ref} fields={self.fields} length={self.length}>"

    def samples_by_indices_nomapping(self, indices: Any) -> Any:
        if isinstance(indices, slice):
            indices = np.arange(*indices.indices(self.length))
        idx = np.asarray(indices)
        if idx.ndim == 0 and idx.dtype.kind in "iu":  # one sample: its row, as numpy indexing gives
            rows = self.samples_by_indices_nomapping(idx.reshape(1))
            if self.include_indices:
                return (indices, *(a[0] for a in rows[1:]))
            return tuple(a[0] for a in rows)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise IndexError(
                f"indices should be a 1-D integer array (as numpy indexing), got {idx.dtype} with shape {idx.shape}"
            )
        if idx.size and (idx.min() < -self.length or idx.max() >= self.length):
            bad = idx[(idx < -self.length) | (idx >= self.length)][0]
            raise IndexError(f"index {bad} is out of bounds for axis 0 with size {self.length}")
        batch = tuple(gather_rows(self.client, self.source_ref, idx, self.fields))
        if self.include_indices:
            return (indices,) + batch
        return batch

    def _n_arrays(self) -> int:
        return len(self.fields) + (1 if self.include_indices else 0)

    def _server_target(self) -> tuple[Any, dict[str, Any], list[str]] | None:
        return (self.client, self.source_ref, self.fields) if plan_for(self.sampler) is not None else None

    def _stream(
        self,
        batch_size: int,
        shuffle: Any,
        maps: list[Any] | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[Any] | None:
        """Batches streamed from the server (``maps`` applied there), or ``None``."""
        return stream_from(
            self.client,
            self.source_ref,
            self.sampler,
            batch_size,
            shuffle,
            self.include_indices,
            self.fields,
            maps,
            shard,
        )


class RemoteArray:
    """One field of a source held by a server, as a read-only array-like.

    It has ``len``, ``shape``, ``dtype`` and ``ndim``; indexing (an int, a slice or an
    integer array) gathers those rows from the server, and ``np.asarray`` fetches them all.
    Drop-in datasets hand these out as their ``train_X``, ``train_y``, ...: an
    ``ArrayDataSource`` made only of fields of one source streams straight from it.
    """

    FETCH_ROWS_BYTES = 64 << 20  #: ``np.asarray`` gathers in pieces of about this size

    def __init__(self, client: Any, source: dict[str, Any], field: str, length: int, info: dict[str, Any]):
        self.client = client
        self.source_ref = source
        self.field = field
        self.dtype = np.dtype(info["dtype"])
        self.shape = (int(length), *(int(d) for d in info["shape"]))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<RemoteArray {self.source_ref} field {self.field!r} shape={self.shape} dtype={self.dtype}>"

    def _rows(self, idx: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if not len(idx):
            return np.zeros((0, *self.shape[1:]), self.dtype)
        (rows,) = gather_rows(self.client, self.source_ref, idx, [self.field])
        return np.asarray(rows)

    def __getitem__(self, key: Any) -> Any:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        n = len(self)
        if isinstance(first, slice):
            rows = self._rows(np.arange(*first.indices(n)))
        elif isinstance(first, int | np.integer):
            if not -n <= first < n:
                raise IndexError(f"index {first} is out of bounds for axis 0 with size {n}")
            rows = self._rows(np.array([first]))[0]
        else:
            idx = np.asarray(first)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            if idx.dtype.kind not in "iu":
                raise IndexError(
                    f"only integers, slices and integer or boolean arrays are valid indices, got {idx.dtype}"
                )
            bad = idx[(idx < -n) | (idx >= n)]
            if len(bad):
                raise IndexError(f"index {bad[0]} is out of bounds for axis 0 with size {n}")
            rows = self._rows(idx.reshape(-1)).reshape(idx.shape + self.shape[1:])
        return (
            rows[(slice(None), *rest)]
            if rest and not isinstance(first, int | np.integer)
            else (rows[rest] if rest else rows)
        )

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]:
        row_bytes = max(1, int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize)
        step = max(1, self.FETCH_ROWS_BYTES // row_bytes)
        out = np.empty(self.shape, self.dtype)
        for start in range(0, len(self), step):
            stop = min(start + step, len(self))
            out[start:stop] = self._rows(np.arange(start, stop))
        return out if dtype is None else out.astype(dtype, copy=False)


def common_remote_source(data: list[Any]) -> tuple[Any, dict[str, Any], list[str]] | None:
    """``(client, source, fields)`` when every array of ``data`` is a :class:`RemoteArray`
    of one source on one server (an ``ArrayDataSource`` of them streams from it)."""
    if not data or not all(isinstance(d, RemoteArray) for d in data):
        return None
    first = data[0]
    if any(d.client is not first.client or d.source_ref != first.source_ref for d in data):
        return None
    return first.client, first.source_ref, [d.field for d in data]


class SourceMethods:
    """``source`` and ``array_source`` for clients of one server or of several."""

    def source(
        self,
        name: str,
        indices: Any = None,
        repeats: int = 1,
        include_indices: bool = False,
        sampler: Any = None,
        fields: list[str] | str | None = None,
        wait: float | None = None,
        **params: Any,
    ) -> RemoteDataSource:
        """A named source of the server, as a batchup ``RandomAccessDataSource``.

        ``name`` is a source of the server's config, or a standard dataset (``"mnist"``,
        ``"cifar10"``, ...) with its split and batchup's parameters as keywords::

            client.source("cifar10", split="train", n_val=10000, val_lower=-1.0, val_upper=1.0)

        ``fields`` picks fields by name, in the order the batches give them (a dataset's:
        ``X``, ``X_u8``, ``y``, ``y_coarse``; one name for one field; by default what
        batchup's attributes hold: ``X`` and ``y``). A dataset the server is
        still fetching is waited for, up to ``wait`` seconds (``None``: as long as it takes).
        """
        if not isinstance(name, str):
            raise TypeError(f"a source's name should be a string, got {name!r:.80}")
        ref: dict[str, Any] = {"name": name, "params": params} if params else {"name": name}
        return RemoteDataSource(self, ref, indices, repeats, sampler, include_indices, fields, wait)

    def array_source(
        self,
        data: list[Any],
        indices: Any = None,
        repeats: int = 1,
        include_indices: bool = False,
        sampler: Any = None,
    ) -> RemoteDataSource:
        """Hand ``data`` (a list of equally long arrays) to the server once; stream from it."""
        check_array_list(data)
        # kept as arrays: sent again should the server delete them unused
        arrays = [a if isinstance(a, np.ndarray) else np.asarray(a) for a in data]
        keys = self.ensure_arrays(arrays)  # type: ignore[attr-defined]
        source = RemoteDataSource(self, {"arrays": keys}, indices, repeats, sampler, include_indices)
        source.arrays = arrays
        return source
