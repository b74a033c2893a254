"""The augmentation workload: random crop (4-pixel zero padding) + random horizontal flip.

Self-contained on purpose (numpy, os and time only): the service may ship ``augment`` to
its worker processes with cloudpickle by value, and anything this module imported from
the bench would have to be importable there too.

Like batchup's README example, ``augment`` draws from the global ``np.random``, so every
process that runs it uses its own copy of that state.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np

PAD = 4


def augment(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop every (C, H, W) image at a random offset of its zero-padded copy; flip half of them.

    One vectorised gather: the padded batch is indexed with per-sample row and column index
    arrays (columns reversed for the flipped samples). About 5 ms per 256 CIFAR-shaped images.
    """
    n, c, h, w = X.shape
    padded = np.zeros((n, c, h + 2 * PAD, w + 2 * PAD), dtype=X.dtype)
    padded[:, :, PAD : PAD + h, PAD : PAD + w] = X
    top = np.random.randint(0, 2 * PAD + 1, size=n)
    left = np.random.randint(0, 2 * PAD + 1, size=n)
    flip = np.random.random_sample(n) < 0.5
    rows = top[:, None] + np.arange(h)
    cols = left[:, None] + np.arange(w)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    out = padded[
        np.arange(n)[:, None, None, None],
        np.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    return out, y


def where_probe(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A map function that reports where it ran: every label becomes this process's pid."""
    return X, np.full_like(y, os.getpid())


def calibrate(
    shape: tuple[int, ...], batch_size: int = 256, repeats: int = 7, loops: int = 20
) -> dict[str, Any]:
    """``augment``'s cost per batch in this process: median and best of ``repeats`` timings."""
    rs = np.random.RandomState(0)
    X = rs.random_sample((batch_size, *shape)).astype(np.float32)
    y = rs.randint(0, 10, size=batch_size).astype(np.int32)
    augment(X, y)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            augment(X, y)
        times.append((time.perf_counter() - t0) / loops)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "batch": batch_size}
