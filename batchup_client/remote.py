"""Sources that live on the server: ``client.source("name")`` and ``client.array_source``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .data_source import RandomAccessDataSource, stream_from

__all__ = ["RemoteDataSource"]


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
        fields: list[str] | None = None,
    ):
        info = client.describe(source)
        self.client = client
        self.source_ref = source
        self.length = info.length
        self.metadata = dict(info.metadata)
        available = [f["name"] for f in info.fields]
        if fields is not None:
            missing = [f for f in fields if f not in available]
            if missing:
                raise ValueError(f"source has no field(s) {missing}; it has {available}")
        self.fields = list(fields) if fields is not None else available
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
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise IndexError(
                f"indices should be a 1-D integer array (as numpy indexing), got {idx.dtype} with shape {idx.shape}"
            )
        if idx.size and (idx.min() < -self.length or idx.max() >= self.length):
            bad = idx[(idx < -self.length) | (idx >= self.length)][0]
            raise IndexError(f"index {bad} is out of bounds for axis 0 with size {self.length}")
        batch = tuple(self.client.gather(self.source_ref, idx, self.fields))
        if self.include_indices:
            return (indices,) + batch
        return batch

    def batch_iterator(self, batch_size: int, shuffle: Any = None, **kwargs: Any) -> Iterator[Any]:
        remote = stream_from(
            self.client,
            self.source_ref,
            self.sampler,
            batch_size,
            shuffle,
            self.include_indices,
            self.fields,
        )
        if remote is None:
            yield from self._local_batches(batch_size, shuffle)
        else:
            yield from remote
