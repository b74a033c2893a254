"""What a stream may read: the server's sources, resolved from a request's source reference.

A request names a configured source (``{"name": ...}``), a standard dataset with its
parameters (``{"name": "mnist", "params": {...}}``), arrays a client uploaded or shared
(``{"arrays": [key, ...]}``) or a composite of those. :class:`SourceCatalog` turns that
reference into a :class:`SourceEntry` (the spec workers open, its length and fields) or a
:class:`RequestError` that says what was wrong. No sockets here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from batchup_protocol import ErrorCode

from .datasets.catalog import DATASETS, UnknownDatasetError
from .datasets.layout import DatasetRequestError
from .datasets.service import DatasetNotReady, DatasetService
from .datasets.store import DatasetUnavailable
from .errors import RequestError
from .sources import FieldSpec, SourceError, SourceSpec, open_source
from .uploads import Uploads

__all__ = ["SourceCatalog", "SourceEntry", "in_range"]


@dataclasses.dataclass
class SourceEntry:
    spec: SourceSpec
    length: int
    fields: list[dict[str, Any]]
    row_bytes: list[int]  # per field


def in_range(indices: np.ndarray[Any, Any], length: int) -> bool:
    """Whether every index is valid for ``length`` rows (negatives count from the end)."""
    return not indices.size or (indices.min() >= -length and indices.max() < length)


class SourceCatalog:
    """The configured sources (described once, at start), uploaded arrays and standard
    datasets (described when first asked for)."""

    def __init__(self, sources: dict[str, SourceSpec], uploads: Uploads, datasets: DatasetService):
        self.uploads = uploads
        self.datasets = datasets
        self.sources: dict[str, SourceEntry] = {name: self.describe(spec) for name, spec in sources.items()}
        #: described dataset splits, by the identity of the spec the dataset service keeps
        self._dataset_entries: dict[int, SourceEntry] = {}

    @staticmethod
    def describe(spec: SourceSpec) -> SourceEntry:
        opened = open_source(spec)
        try:
            fields = opened.field_info()
            row_bytes = [opened.row_bytes([i]) for i in range(len(fields))]
            return SourceEntry(spec, opened.length, fields, row_bytes)
        finally:
            opened.close()

    def resolve(self, source: dict[str, Any]) -> SourceEntry:
        if "arrays" in source:
            keys = source["arrays"]
            if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
                raise RequestError(ErrorCode.MALFORMED, "source.arrays should be a non-empty list of keys")
            missing = [k for k in keys if k not in self.uploads.paths]
            if missing:  # (never given, or unused and deleted: the client sends it again)
                raise RequestError(ErrorCode.UNKNOWN_SOURCE, f"no array uploaded with key(s) {missing}")
            self.uploads.touch(keys)
            spec = SourceSpec(
                "arrays", tuple(FieldSpec(str(i), "npy", self.uploads.paths[k]) for i, k in enumerate(keys))
            )
            try:
                return self.describe(spec)
            except SourceError as exc:
                raise RequestError(ErrorCode.INVALID_ARGUMENT, str(exc)) from exc
        name, params = source.get("name"), source.get("params")
        if not isinstance(name, str):
            raise RequestError(ErrorCode.MALFORMED, f"source.name should be a string, got {name!r}")
        if params is not None and not isinstance(params, dict):
            raise RequestError(ErrorCode.MALFORMED, "source.params should be a map")
        entry = self.sources.get(name)
        if entry is not None:
            if params:
                raise RequestError(ErrorCode.INVALID_ARGUMENT, f"source {name!r} takes no parameters")
            return entry
        return self.dataset(name, params or {})

    def dataset(self, name: str, params: dict[str, Any]) -> SourceEntry:
        """A standard dataset's split (see batchup_server.datasets)."""
        try:
            spec = self.datasets.spec(name, params)
        except UnknownDatasetError:
            raise RequestError(
                ErrorCode.UNKNOWN_SOURCE,
                f"unknown source {name!r}; this server has {sorted(self.sources)} and the datasets "
                f"{sorted(DATASETS)}",
            ) from None
        except DatasetRequestError as exc:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, str(exc)) from exc
        except DatasetNotReady as exc:
            raise RequestError(ErrorCode.NOT_READY, str(exc)) from exc
        except DatasetUnavailable as exc:
            raise RequestError(ErrorCode.UNAVAILABLE, str(exc)) from exc
        except SourceError as exc:
            raise RequestError(ErrorCode.UNAVAILABLE, f"{name}: {exc}") from exc
        entry = self._dataset_entries.get(id(spec))
        if entry is None or entry.spec is not spec:
            try:
                entry = self._dataset_entries[id(spec)] = self.describe(spec)
            except SourceError as exc:
                raise RequestError(ErrorCode.UNAVAILABLE, f"{name}: {exc}") from exc
        return entry

    @staticmethod
    def check_plan_fits(plan: dict[str, Any], arrays: list[Any], length: int) -> None:
        """A (child) plan's indices lie in its source; a standard plan has its length."""
        pos = plan.get("indices")
        if isinstance(pos, int) and 0 <= pos < len(arrays):
            arr = arrays[pos]
            if arr.dtype.kind in "iu" and not in_range(arr, length):
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"indices out of range for a source of {length} rows (0 <= index < {length})",
                )
        pos = plan.get("weights")
        if plan.get("kind") == "weighted" and isinstance(pos, int) and 0 <= pos < len(arrays):
            if len(arrays[pos]) > length:  # fewer: batchup draws from the first rows
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"plan weights should have at most one weight per row of the source ({length}), "
                    f"got {len(arrays[pos])}",
                )
        if plan.get("kind") == "standard" and plan.get("length") != length:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"plan length {plan.get('length')} differs from the source's length {length}",
            )

    def composite_parts(self, source: dict[str, Any]) -> list[tuple[SourceEntry, list[int], bool]]:
        """``{"composite": [{"source": ref, "fields": [...]|None, "include_indices": bool}, ...]}``."""
        children = source.get("composite")
        if not isinstance(children, list) or not children or not all(isinstance(c, dict) for c in children):
            raise RequestError(ErrorCode.MALFORMED, "source.composite should be a non-empty list of maps")
        parts = []
        for child in children:
            ref = child.get("source")
            if not isinstance(ref, dict) or "composite" in ref:
                raise RequestError(
                    ErrorCode.MALFORMED, "a composite child's source should be a plain source reference"
                )
            entry = self.resolve(ref)
            names = child.get("fields")
            if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise RequestError(
                    ErrorCode.MALFORMED, "a composite child's fields should be a list of names"
                )
            parts.append((entry, self.select(entry, names), bool(child.get("include_indices", False))))
        return parts

    def select(self, entry: SourceEntry, names: list[str] | None) -> list[int]:
        all_names = [f["name"] for f in entry.fields]
        if names is None:
            return list(range(len(all_names)))
        missing = [n for n in names if n not in all_names]
        if missing:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT, f"source has no field(s) {missing}; it has {all_names}"
            )
        return [all_names.index(n) for n in names]
