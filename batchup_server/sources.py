"""Data sources: named lists of equally long arrays ("fields") that workers gather from.

A :class:`SourceSpec` is a small, picklable-free description (plain dicts/strings) that
the router sends to workers; each worker opens the files itself after it starts
(memory maps, HDF5 handles), because open handles are not fork- or pickle-safe.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from batchup_protocol import check_dtype

__all__ = ["FieldSpec", "OpenedSource", "SourceError", "SourceSpec", "open_source"]


class SourceError(Exception):
    """A source's files are missing, unreadable or inconsistent."""


@dataclasses.dataclass(frozen=True, slots=True)
class FieldSpec:
    """Where one field lives: an ``.npy`` file (memory-mapped) or an HDF5 dataset.

    A field may be a view of its array: ``rows`` keeps rows ``[start, stop)``, ``row_index``
    names an ``.npy`` of row numbers to keep (in that order), and ``scale`` maps uint8
    values to float32 in ``[lower, upper]`` as batchup's ``ImageArrayUInt8ToFloat32``.
    """

    name: str
    kind: str  # "npy" or "h5"
    path: str
    dataset: str = ""
    rows: tuple[int, int] | None = None
    row_index: str = ""
    scale: tuple[float, float] | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"name": self.name, "kind": self.kind, "path": self.path}
        if self.dataset:
            wire["dataset"] = self.dataset
        if self.rows is not None:
            wire["rows"] = list(self.rows)
        if self.row_index:
            wire["row_index"] = self.row_index
        if self.scale is not None:
            wire["scale"] = list(self.scale)
        return wire

    @staticmethod
    def from_wire(d: dict[str, Any]) -> FieldSpec:
        rows, scale = d.get("rows"), d.get("scale")
        return FieldSpec(
            str(d["name"]),
            str(d["kind"]),
            str(d["path"]),
            str(d.get("dataset", "")),
            (int(rows[0]), int(rows[1])) if rows is not None else None,
            str(d.get("row_index", "")),
            (float(scale[0]), float(scale[1])) if scale is not None else None,
        )

    @property
    def key(self) -> tuple[Any, ...]:
        """Identifies what a worker opens (equal keys share one opened field)."""
        return (self.kind, self.path, self.dataset, self.rows, self.row_index, self.scale)


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


def open_h5(path: str) -> Any:
    """An HDF5 file opened read-only, with ``hdf5plugin``'s filters (blosc & co., which
    caches written by batchup itself use) registered."""
    import h5py

    try:
        import hdf5plugin  # noqa: F401  (registers the filters with HDF5)
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    return h5py.File(path, "r")


def _h5_array(path: str, dataset: str) -> Any:
    """An HDF5 dataset: memory-mapped when it is contiguous and unfiltered (fast gathers,
    no h5py handle kept), else the h5py dataset itself (compressed or chunked files,
    e.g. caches written by batchup with blosc; see :func:`open_h5`)."""
    f = open_h5(path)
    try:
        if dataset not in f:
            raise SourceError(f"{path} has no dataset {dataset!r}")
        d = f[dataset]
        if not hasattr(d, "chunks"):  # a group, say
            raise SourceError(f"{path}: {dataset!r} is a {type(d).__name__.lower()}, not a dataset")
        offset = d.id.get_offset() if d.chunks is None and d.compression is None else None
        if offset is not None and d.dtype.kind in "biuf" and len(d.shape) >= 1:
            if offset + d.nbytes > os.path.getsize(path):
                raise SourceError(f"{path}: dataset {dataset!r} runs past the end of the file (truncated?)")
            arr = np.memmap(path, dtype=d.dtype, mode="r", offset=offset, shape=d.shape)
            f.close()
            return arr
        if len(d.shape) == 0 and d.size == 0:  # an empty dataset (h5py has no storage for it)
            raise SourceError(f"{path}: dataset {dataset!r} is empty")
        return d  # keeps the file open; closed by OpenedSource.close
    except BaseException:
        if f.id.valid:
            f.close()
        raise


class _ArrayLike:
    """A plugin source's field (anything with ``len`` and ``[int array]``, as batchup's
    ``ArrayDataSource`` accepts), with the dtype and row shape of its first row."""

    def __init__(self, obj: Any, what: str):
        self.obj = obj
        n = len(obj)
        first = np.asarray(obj[np.array([0])]) if n else None
        dtype = getattr(obj, "dtype", None)
        shape = getattr(obj, "shape", None)
        if first is not None and first.ndim >= 1 and len(first) != 1:
            raise SourceError(f"{what}: [array of 1 index] gave {len(first)} rows")
        self.dtype = np.dtype(dtype if dtype is not None else first.dtype if first is not None else "f4")
        row = tuple(shape[1:]) if shape is not None else (first.shape[1:] if first is not None else ())
        self.shape = (n, *row)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray[Any, Any]:
        return np.asarray(self.obj[idx], dtype=self.dtype)


_PLUGIN_SOURCES: dict[tuple[str, str], Any] = {}  # (kind, args) -> fields, per process


def _plugin_made(kind: str, args_json: str) -> dict[str, Any]:
    """The fields a plugin source's factory makes (made once per process)."""
    from .plugins import Registry

    fields = _PLUGIN_SOURCES.get((kind, args_json))
    if fields is None:
        try:
            factory = Registry().source(kind)
        except KeyError as exc:
            raise SourceError(str(exc.args[0])) from None
        try:
            made = factory(**json.loads(args_json or "{}"))
        except Exception as exc:
            raise SourceError(f"plugin source {kind!r} failed: {type(exc).__name__}: {exc}") from exc
        fields = made if isinstance(made, dict) else {str(i): a for i, a in enumerate(made)}
        _PLUGIN_SOURCES[(kind, args_json)] = fields
    return fields


def _plugin_array(field: FieldSpec) -> Any:
    fields = _plugin_made(field.path, field.dataset)
    if field.name not in fields:
        raise SourceError(f"plugin source {field.path!r} has no field {field.name!r}; it has {list(fields)}")
    arr = fields[field.name]
    return arr if isinstance(arr, np.ndarray) else _ArrayLike(arr, f"plugin source {field.path!r}")


def plugin_fields(kind: str, args: dict[str, Any]) -> list[str]:
    """The field names a plugin source makes."""
    return list(_plugin_made(kind, json.dumps(args, sort_keys=True)))


def _open_array(field: FieldSpec) -> Any:
    try:
        if field.kind == "npy":
            arr = np.load(field.path, mmap_mode="r", allow_pickle=False)
            if not isinstance(arr, np.ndarray):  # an .npz archive (np.load opens both)
                arr.close()
                raise SourceError(
                    f"field {field.name!r}: {field.path} is an .npz archive, not an .npy file; "
                    f"serve it with npz = {field.path!r} (and keys = [...] to pick arrays)"
                )
            return arr
        if field.kind == "h5":
            return _h5_array(field.path, field.dataset)
        if field.kind == "plugin":
            return _plugin_array(field)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"cannot open field {field.name!r} from {field.path}: {exc}") from exc
    raise SourceError(f"field kind should be 'npy', 'h5' or 'plugin', got {field.kind!r}")


class _Field:
    """One opened field: an array (memory map or h5py dataset), the rows of it the field
    shows, and the uint8 -> float32 mapping if any. ``take`` gathers rows by field index."""

    def __init__(self, spec: FieldSpec):
        self.spec = spec
        base = _open_array(spec)
        self.base = base
        self.index: np.ndarray[Any, Any] | None = None
        n = len(base)
        if spec.rows is not None:
            start, stop = spec.rows
            if not 0 <= start <= stop <= n:
                raise SourceError(f"field {spec.name!r}: rows [{start}, {stop}) outside [0, {n}]")
            if isinstance(base, np.ndarray):
                self.base = base[start:stop]  # a view: free
            else:
                self.index = np.arange(start, stop, dtype=np.int64)
        if spec.row_index:
            index = np.load(spec.row_index, allow_pickle=False)
            rows = len(self.index) if self.index is not None else len(self.base)  # after `rows`
            if (
                index.ndim != 1
                or index.dtype.kind not in "iu"
                or (len(index) and (index.min() < 0 or index.max() >= rows))
            ):
                raise SourceError(f"field {spec.name!r}: bad row index file {spec.row_index}")
            self.index = index.astype(np.int64) if self.index is None else self.index[index]
        self.length = len(self.index) if self.index is not None else len(self.base)
        self.stored_dtype = np.dtype(base.dtype)
        self.row_shape = tuple(int(d) for d in base.shape[1:])
        self.scale: tuple[np.float32, np.float32] | None = None
        if spec.scale is not None:
            if self.stored_dtype != np.uint8:
                raise SourceError(
                    f"field {spec.name!r}: only uint8 data can be scaled, not {self.stored_dtype}"
                )
            lower, upper = spec.scale
            self.scale = (np.float32((upper - lower) / 255.0), np.float32(lower))
        self.dtype = np.dtype(np.float32) if self.scale is not None else self.stored_dtype
        self._u8: np.ndarray[Any, Any] | None = None  # reused buffer for scaled gathers

    def take(self, indices: np.ndarray[Any, Any], out: np.ndarray[Any, Any] | None) -> np.ndarray[Any, Any]:
        rows = indices if self.index is None else self.index[indices]
        if self.scale is None:
            return self._read(rows, out)
        n = len(rows)
        if self._u8 is None or len(self._u8) < n:
            self._u8 = np.empty((n, *self.row_shape), np.uint8)
        raw = self._read(rows, self._u8[:n])
        if out is None:
            out = np.empty(raw.shape, np.float32)
        # batchup: arr_u8.astype(np.float32) * scale + offset, all in float32 (bit for bit)
        np.multiply(raw, self.scale[0], out=out, dtype=np.float32)
        np.add(out, self.scale[1], out=out)
        return out

    def _read(self, rows: np.ndarray[Any, Any], out: np.ndarray[Any, Any] | None) -> np.ndarray[Any, Any]:
        a = self.base
        if not len(rows):  # an empty batch (a shard's share of a tiny last batch)
            return out if out is not None else np.empty((0, *self.row_shape), self.stored_dtype)
        if isinstance(a, np.ndarray):  # np.memmap included: gather as a plain ndarray
            # mode="wrap" is unbuffered (range already checked; wraps negatives as Python does)
            return np.take(a.view(np.ndarray), rows, axis=0, out=out, mode="wrap")
        uniq, inverse = np.unique(rows % len(a), return_inverse=True)  # h5py: sorted, unique
        got = np.asarray(a[uniq])[inverse]
        if out is None:
            return got
        out[...] = got
        return out

    def close(self) -> None:
        if self.spec.kind == "plugin":
            return  # kept for the process's later streams (plugins may be costly to set up)
        f = getattr(self.base, "file", None)
        if f is not None and hasattr(f, "close"):
            f.close()


class OpenedSource:
    """A source's fields opened for reading; ``gather`` builds batches."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.fields: list[_Field] = []
        try:
            for field_spec in spec.fields:
                self.fields.append(_Field(field_spec))
        except BaseException:
            self.close()
            raise
        self.names = [f.name for f in spec.fields]
        lengths = {f.length for f in self.fields}
        if len(lengths) > 1:
            detail = ", ".join(f"{n}: {f.length}" for n, f in zip(self.names, self.fields))
            self.close()
            raise SourceError(f"source {spec.name!r} has fields of different lengths ({detail})")
        self.length = lengths.pop() if lengths else 0
        for name, f in zip(self.names, self.fields):
            try:
                check_dtype(f.dtype)
            except TypeError as exc:
                self.close()
                raise SourceError(f"source {spec.name!r} field {name!r}: {exc}") from exc

    def field_info(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "dtype": f.dtype.str, "shape": list(f.row_shape)}
            for n, f in zip(self.names, self.fields)
        ]

    def row_bytes(self, fields: list[int]) -> int:
        total = 0
        for i in fields:
            f = self.fields[i]
            total += int(np.prod(f.row_shape, dtype=np.int64)) * f.dtype.itemsize
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
        return [self.fields[i].take(indices, None) for i in fields]

    def gather_into(
        self, indices: np.ndarray[Any, Any], fields: list[int], outs: list[np.ndarray[Any, Any]]
    ) -> None:
        """Like :meth:`gather`, writing into ``outs`` (views of a shared-memory slot)."""
        self._check_range(indices)
        for i, out in zip(fields, outs):
            self.fields[i].take(indices, out)

    def out_spec(self, field: int, n: int) -> tuple[np.dtype[Any], tuple[int, ...]]:
        f = self.fields[field]
        return f.dtype, (n, *f.row_shape)

    def close(self) -> None:
        for f in self.fields:
            f.close()


def open_source(spec: SourceSpec) -> OpenedSource:
    if not spec.fields:
        raise SourceError(f"source {spec.name!r} has no fields")
    for f in spec.fields:
        if f.kind != "plugin" and not os.path.exists(f.path):
            raise SourceError(f"source {spec.name!r}: file {f.path} does not exist")
    return OpenedSource(spec)
