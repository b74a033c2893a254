"""Applying a stream's transforms (``ds.map(fn)``) to a gathered batch, in a worker.

Pure of sockets. A transform is a client function shipped with cloudpickle (only to a
server that trusts client code) or a named transform of a plugin. Before the transforms
of batch ``seq`` run, the worker seeds numpy's global legacy RNG and Python's ``random``
from ``(transform_seed, seq)``: a random augmentation draws the same numbers whichever
worker (or server) runs the batch, and never from a worker's own state.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np

from batchup_protocol import check_dtype

__all__ = ["CodeCache", "TransformError", "apply_transforms", "seed_for_batch"]


class TransformError(TypeError):
    """A transform returned something that cannot travel as a batch."""


def seed_for_batch(transform_seed: int, seq: int) -> None:
    """Seed ``np.random`` (legacy global) and ``random`` for batch ``seq`` of a stream."""
    state = np.random.SeedSequence([transform_seed & (2**64 - 1), seq]).generate_state(4)
    np.random.seed(state)
    random.seed(int.from_bytes(state.tobytes(), "little"))


def _as_array(value: Any, where: str) -> np.ndarray[Any, Any]:
    if not isinstance(value, np.ndarray):
        raise TransformError(
            f"{where} is a {type(value).__name__}; a transform must return numpy arrays (one array, "
            "or a tuple or list of them) for its result to cross the wire"
        )
    try:
        check_dtype(value.dtype)
    except TypeError as exc:
        raise TransformError(f"{where}: {exc}") from exc
    return value if value.flags.c_contiguous else np.ascontiguousarray(value)


def normalise(result: Any) -> tuple[str, list[np.ndarray[Any, Any]]]:
    """``(container, arrays)`` for a transform's result (see ``Batch.container``)."""
    if result is None:
        return "none", []
    if isinstance(result, np.ndarray):
        return "array", [_as_array(result, "the result")]
    if isinstance(result, tuple | list):
        arrays = [_as_array(v, f"element {i} of the result") for i, v in enumerate(result)]
        return ("" if isinstance(result, tuple) else "list"), arrays
    raise TransformError(
        f"the result is a {type(result).__name__}; a transform must return numpy arrays (one array, "
        "or a tuple or list of them), or None"
    )


def apply_transforms(
    fns: list[Callable[[Any], Any]], batch: list[np.ndarray[Any, Any]], transform_seed: int, seq: int
) -> tuple[str, list[np.ndarray[Any, Any]]]:
    """Run ``fns`` in order (``fn(*batch)``, as batchup's ``MapDataSource``)."""
    seed_for_batch(transform_seed, seq)
    value: Any = tuple(batch)
    for fn in fns:
        value = fn(*value)  # as batchup: a map of a map unpacks the inner result
    return normalise(value)


class CodeCache:
    """Functions by content key, unpickled once per worker process."""

    def __init__(self) -> None:
        self._fns: dict[str, Callable[..., Any]] = {}

    def add(self, key: str, payload: bytes) -> None:
        import cloudpickle

        self._fns[key] = cloudpickle.loads(payload)

    def get(self, key: str) -> Callable[..., Any]:
        return self._fns[key]
