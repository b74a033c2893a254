"""``batch_map_concat`` and ``batch_map_mean``: batchup 0.2.3's loops over a batch iterator."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = ["batch_map_concat", "batch_map_mean", "length_of_batch"]


def length_of_batch(batch: Any) -> int:
    """Samples in a batch: ``len`` of the first array, recursing into tuples (not lists)."""
    while isinstance(batch, tuple):
        batch = batch[0]
    return len(batch)


def _wrap(
    batch_iter: Iterable[Any], progress_iter_func: Callable[..., Any] | None, n_batches: int | None
) -> Any:
    if progress_iter_func is not None:
        return progress_iter_func(batch_iter, total=n_batches, leave=False)
    return batch_iter


def _call(func: Callable[..., Any], batch: Any, prepend_args: tuple[Any, ...] | None) -> Any:
    if prepend_args is not None:
        return func(*(prepend_args + tuple(batch)))
    return func(*batch)


def batch_map_concat(
    func: Callable[..., Any],
    batch_iter: Iterable[Any],
    progress_iter_func: Callable[..., Any] | None = None,
    n_batches: int | None = None,
    prepend_args: tuple[Any, ...] | None = None,
) -> tuple[np.ndarray[Any, Any], ...] | None:
    """Apply ``func`` to each batch and concatenate its per-sample results.

    ``func`` returns ``None`` (skipped), an array, or a tuple of arrays. Returns a tuple
    of concatenated arrays, or ``None`` when nothing was returned. At most
    ``n_batches`` batches are taken from ``batch_iter`` (the rest stay in it).
    """
    results: list[tuple[Any, ...]] = []
    n_processed = 0
    for batch in _wrap(batch_iter, progress_iter_func, n_batches):
        out = _call(func, batch, prepend_args)
        if isinstance(out, np.ndarray):
            out = (out,)
        elif out is not None and not isinstance(out, tuple):
            raise TypeError(
                "Batch function should return a tuple of results, a single result as a NumPy "
                f"array, or None, not {type(out)}"
            )
        if out is not None:
            results.append(out)
        n_processed += 1
        if n_batches is not None and n_processed >= n_batches:
            break
    if not results:
        return None
    return tuple(np.concatenate(list(column), axis=0) for column in zip(*results))


def batch_map_mean(
    func: Callable[..., Any],
    batch_iter: Iterable[Any],
    progress_iter_func: Callable[..., Any] | None = None,
    sum_axis: Any = None,
    n_batches: int | None = None,
    prepend_args: tuple[Any, ...] | None = None,
) -> tuple[Any, ...] | None:
    """Apply ``func`` to each batch and return the per-sample mean of its results.

    With ``sum_axis=None`` ``func`` returns per-batch *sums*; otherwise its results are
    summed over ``sum_axis`` first. Results are divided by the number of samples seen.
    """
    accum: list[Any] | None = None
    n_samples = 0
    n_processed = 0
    for batch in _wrap(batch_iter, progress_iter_func, n_batches):
        batch_n = length_of_batch(batch)
        out = _call(func, batch, prepend_args)
        if isinstance(out, (np.ndarray, float)):
            out = (out,)
        elif out is not None and not isinstance(out, tuple):
            raise TypeError(
                "Batch function should return a tuple of results, a single result as a NumPy "
                f"array or float, or None, not {type(out)}"
            )
        if out is not None:
            if sum_axis is not None:
                out = tuple(r.sum(axis=sum_axis) for r in out)
            if accum is None:
                accum = list(out)
            else:
                for i in range(len(accum)):
                    accum[i] += out[i]
        n_samples += batch_n
        n_processed += 1
        if n_batches is not None and n_processed >= n_batches:
            break
    if accum is None:
        return None
    return tuple(np.array(r).astype(float) / n_samples for r in accum)
