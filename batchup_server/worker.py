"""What a worker process does with a task: open sources, gather rows, build the reply.

Pure of sockets (the worker's socket loop is :func:`batchup_server.router.worker_main`).
Sources and slot pools are opened here, in the worker, after it started: open HDF5
handles and memory maps must not cross a process boundary.
"""

from __future__ import annotations

import functools
import traceback
from typing import Any

import numpy as np

import batchup_protocol as proto
from batchup_protocol import ErrorCode
from batchup_protocol.arrays import slot_layout

from .plugins import Registry
from .sources import OpenedSource, SourceSpec, open_source
from .transforms import CodeCache, apply_transforms

__all__ = ["TaskRunner"]


class TaskRunner:
    """Runs gather tasks; keeps sources and slot pools open between tasks."""

    def __init__(self, registry: Registry | None = None) -> None:
        self._sources: dict[tuple[Any, ...], OpenedSource] = {}
        self._pools: dict[str, np.memmap[Any, Any]] = {}
        self.registry = registry or Registry()
        self.code = CodeCache()
        self._last: tuple[Any, Any] = (None, None)  #: the last wire dict and its source

    def _transforms(self, specs: list[dict[str, Any]]) -> list[Any]:
        fns = []
        for spec in specs:
            if "code" in spec:
                fn = self.code.get(spec["code"])
            else:
                fn = functools.partial(self.registry.transform(spec["name"]), **(spec.get("params") or {}))
            fns.append(fn)
        return fns

    def _source(self, wire: dict[str, Any]) -> OpenedSource:
        if wire is self._last[0]:  # the batches of one task message share one wire dict
            return self._last[1]
        spec = SourceSpec.from_wire(wire)
        key = tuple(f.key for f in spec.fields)
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = open_source(spec)
        self._last = (wire, source)
        return source

    def _pool(self, path: str) -> np.memmap[Any, Any]:
        pool = self._pools.get(path)
        if pool is None:
            pool = self._pools[path] = np.memmap(path, dtype=np.uint8, mode="r+")
        return pool

    def forget_pool(self, path: str) -> None:
        self._pools.pop(path, None)

    def forget_source(self, path: str) -> None:
        """The server deleted a client array's file: let go of every source that maps it
        (its pages are freed only when the last mapping goes)."""
        for key in [k for k, src in self._sources.items() if any(f.path == path for f in src.spec.fields)]:
            self._sources.pop(key).close()
        self._last = (None, None)

    def run(self, header: dict[str, Any], indices: np.ndarray[Any, Any]) -> tuple[Any, list[Any], str]:
        """The reply to a task: ``(message, arrays, error text or "")``."""
        try:
            transforms = header.get("transforms")
            parts = header.get("parts")
            if parts:
                arrays = self._gather_parts(parts, header["splits"], indices)
            else:
                source = self._source(header["source"])
                if header["slot"] >= 0 and not transforms:
                    return self._into_slot(header, source, indices), [], ""
                arrays = source.gather(indices, header["fields"])
                if header["include_indices"]:
                    arrays = [indices, *arrays]
            if header["gather"]:
                return proto.GatherResult(header["seq"]), arrays, ""
            container = ""
            if transforms:
                fns = self._transforms(transforms)
                container, arrays = apply_transforms(fns, arrays, header["transform_seed"], header["seq"])
            if header["slot"] >= 0:
                placed = self._copy_into_slot(header, arrays, container)
                if placed is not None:
                    return placed, [], ""
            batch = proto.Batch(
                header["stream"],
                header["seq"],
                header["gen"],
                header["rng"],
                container=container,
                supersedes=header.get("supersedes", -1),
            )
            return batch, arrays, ""
        except Exception as exc:
            gather = header["gather"]
            err = proto.Error(
                ErrorCode.REMOTE_EXCEPTION,
                str(exc),
                header["seq"] if gather else 0,
                header["stream"],
                -1 if gather else header["seq"],
                type(exc).__name__,
                "".join(traceback.format_exception(exc)),
                -1 if gather else header["gen"],
            )
            return err, [], f"{type(exc).__name__}: {exc}"

    def _gather_parts(
        self, parts: list[dict[str, Any]], splits: list[int], indices: np.ndarray[Any, Any]
    ) -> list[Any]:
        """A composite's batch: each child's rows from its own source, one after another."""
        arrays: list[Any] = []
        start = 0
        for part, n in zip(parts, splits, strict=True):
            idx = indices[start : start + n]
            start += n
            got = self._source(part["source"]).gather(idx, part["fields"])
            arrays += [idx, *got] if part["include_indices"] else got
        return arrays

    def _copy_into_slot(self, header: dict[str, Any], arrays: list[Any], container: str) -> Any:
        """A transformed batch copied into its slot; ``None`` when it does not fit (it then
        travels as frames, and the router frees the slot)."""
        layout, used = slot_layout([(a.dtype, a.shape) for a in arrays])
        if used > header["slot_bytes"]:
            return None
        for view, a in zip(self._slot_views(header, layout), arrays):
            view[...] = a
        return proto.Batch(
            header["stream"], header["seq"], header["gen"], header["rng"], header["slot"], layout, container
        )

    def _slot_views(self, header: dict[str, Any], layout: list[list[Any]]) -> list[np.ndarray[Any, Any]]:
        """Writable views of the task's slot, one per ``[dtype, shape, offset]`` of ``layout``."""
        pool = self._pool(header["pool"])
        base = header["slot"] * header["slot_bytes"]
        return [
            np.ndarray(tuple(shape), np.dtype(dtype), buffer=pool, offset=base + offset)
            for dtype, shape, offset in layout
        ]

    def _into_slot(self, header: dict[str, Any], source: OpenedSource, indices: np.ndarray[Any, Any]) -> Any:
        """Gather straight into the stream's shared-memory slot; the reply only describes it."""
        n = len(indices)
        specs = [source.out_spec(f, n) for f in header["fields"]]
        if header["include_indices"]:
            specs.insert(0, (indices.dtype, (n,)))
        layout, used = slot_layout(specs)
        slot_bytes = header["slot_bytes"]
        if used > slot_bytes:
            raise ValueError(f"a batch of {used} bytes does not fit a {slot_bytes}-byte slot")
        views = self._slot_views(header, layout)
        if header["include_indices"]:
            views[0][...] = indices
            views = views[1:]
        source.gather_into(indices, header["fields"], views)
        return proto.Batch(
            header["stream"], header["seq"], header["gen"], header["rng"], header["slot"], layout
        )

    def close(self) -> None:
        self._last = (None, None)
        for source in self._sources.values():
            source.close()
        self._sources.clear()
        self._pools.clear()
