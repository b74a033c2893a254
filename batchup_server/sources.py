"""Data sources: named lists of equally long arrays ("fields") that workers gather from.

A :class:`SourceSpec` is a small, picklable-free description (plain dicts/strings) that
the router sends to workers; each worker opens the files itself after it starts
(memory maps, HDF5 handles), because open handles are not fork- or pickle-safe.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from batchup_protocol import check_dtype

__all__ = ["FieldSpec", "OpenedSource", "SourceError", "SourceSpec", "open_source"]


class SourceError(Exception):
    """A source's files are missing, unreadable or inconsistent."""


@dataclasses.dataclass(frozen=True, slots=True)
class FieldSpec:
    """Where one field lives: an ``.npy`` file (memory-mapped) or an HDF5 dataset."""

    name: str
    kind: str  # "npy" or "h5"
    path: str
    dataset: str = ""

    def to_wire(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "path": self.path, "dataset": self.dataset}

    @staticmethod
    def from_wire(d: dict[str, Any]) -> FieldSpec:
        return FieldSpec(str(d["name"]), str(d["kind"]), str(d["path"]), str(d.get("dataset", "")))


@dataclasses.dataclass(frozen=True, slots=True)
class SourceSpec:
    """A source: its name, its fields, and metadata shown to clients."""

    name: str
    fields: tuple[FieldSpec, ...]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "fields": [f.to_wire() for f in self.fields]}

    @staticmethod
    def from_wire(d: dict[str, Any]) -> SourceSpec:
        return SourceSpec(str(d["name"]), tuple(FieldSpec.from_wire(f) for f in d["fields"]))


def _open_field(field: FieldSpec) -> Any:
    try:
        if field.kind == "npy":
            return np.load(field.path, mmap_mode="r", allow_pickle=False)
        if field.kind == "h5":
            import h5py

            f = h5py.File(field.path, "r")
            if field.dataset not in f:
                f.close()
                raise SourceError(f"{field.path} has no dataset {field.dataset!r}")
            return f[field.dataset]
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot open field {field.name!r} from {field.path}: {exc}") from exc
    raise SourceError(f"field kind should be 'npy' or 'h5', got {field.kind!r}")


class OpenedSource:
    """A source's fields opened for reading; ``gather`` builds batches."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.arrays = [_open_field(f) for f in spec.fields]
        self.names = [f.name for f in spec.fields]
        lengths = {len(a) for a in self.arrays}
        if len(lengths) > 1:
            detail = ", ".join(f"{n}: {len(a)}" for n, a in zip(self.names, self.arrays))
            raise SourceError(f"source {spec.name!r} has fields of different lengths ({detail})")
        self.length = lengths.pop() if lengths else 0
        for name, a in zip(self.names, self.arrays):
            try:
                check_dtype(np.dtype(a.dtype))
            except TypeError as exc:
                raise SourceError(f"source {spec.name!r} field {name!r}: {exc}") from exc

    def field_info(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "dtype": np.dtype(a.dtype).str, "shape": list(a.shape[1:])}
            for n, a in zip(self.names, self.arrays)
        ]

    def row_bytes(self, fields: list[int]) -> int:
        total = 0
        for i in fields:
            a = self.arrays[i]
            total += int(np.prod(a.shape[1:], dtype=np.int64)) * np.dtype(a.dtype).itemsize
        return total

    def select(self, names: list[str] | None) -> list[int]:
        """Field positions for ``names`` (all fields when ``None``)."""
        if names is None:
            return list(range(len(self.names)))
        missing = [n for n in names if n not in self.names]
        if missing:
            raise KeyError(f"source {self.spec.name!r} has no field(s) {missing}; it has {self.names}")
        return [self.names.index(n) for n in names]

    def _check_range(self, indices: np.ndarray[Any, Any]) -> None:
        if len(indices) and (indices.min() < -self.length or indices.max() >= self.length):
            raise IndexError(f"indices out of range for source {self.spec.name!r} of length {self.length}")

    def gather(self, indices: np.ndarray[Any, Any], fields: list[int]) -> list[np.ndarray[Any, Any]]:
        """Rows ``indices`` of each selected field, as new C-contiguous arrays."""
        self._check_range(indices)
        return [self._take(self.arrays[i], indices, None) for i in fields]

    def gather_into(
        self, indices: np.ndarray[Any, Any], fields: list[int], outs: list[np.ndarray[Any, Any]]
    ) -> None:
        """Like :meth:`gather`, writing into ``outs`` (views of a shared-memory slot)."""
        self._check_range(indices)
        for i, out in zip(fields, outs):
            self._take(self.arrays[i], indices, out)

    def out_spec(self, field: int, n: int) -> tuple[np.dtype[Any], tuple[int, ...]]:
        a = self.arrays[field]
        return np.dtype(a.dtype), (n, *a.shape[1:])

    def _take(self, a: Any, indices: np.ndarray[Any, Any], out: np.ndarray[Any, Any] | None) -> Any:
        if isinstance(a, np.ndarray):  # np.memmap included: gather as a plain ndarray
            # mode="wrap" is unbuffered (range already checked; wraps negatives as Python does)
            return np.take(a.view(np.ndarray), indices, axis=0, out=out, mode="wrap")
        uniq, inverse = np.unique(indices % self.length, return_inverse=True)  # h5py: sorted, unique
        rows = np.asarray(a[uniq])[inverse]
        if out is None:
            return rows
        out[...] = rows
        return out

    def close(self) -> None:
        for a in self.arrays:
            f = getattr(a, "file", None)
            if f is not None and hasattr(f, "close"):
                f.close()


def open_source(spec: SourceSpec) -> OpenedSource:
    if not spec.fields:
        raise SourceError(f"source {spec.name!r} has no fields")
    for f in spec.fields:
        if not os.path.exists(f.path):
            raise SourceError(f"source {spec.name!r}: file {f.path} does not exist")
    return OpenedSource(spec)
