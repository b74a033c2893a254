"""The built-in ``demo`` source: a small, deterministic 10-class classification set.

Gaussian class clusters in 64 dimensions (float32 ``X``, int32 ``y``), overlapping
enough that a softmax regression's loss falls over a few epochs rather than at once.
"""

from __future__ import annotations

import os

import numpy as np

from .sources import FieldSpec, SourceSpec

__all__ = ["DEMO_CLASSES", "DEMO_FEATURES", "DEMO_SAMPLES", "make_demo_arrays", "write_demo_source"]

DEMO_SAMPLES = 12000
DEMO_FEATURES = 64
DEMO_CLASSES = 10


def make_demo_arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    means = rng.normal(0.0, 1.0, size=(DEMO_CLASSES, DEMO_FEATURES)).astype(np.float32)
    y = rng.randint(0, DEMO_CLASSES, size=DEMO_SAMPLES).astype(np.int32)
    noise = rng.normal(0.0, 2.5, size=(DEMO_SAMPLES, DEMO_FEATURES)).astype(np.float32)
    return (means[y] + noise).astype(np.float32), y


def write_demo_source(folder: str) -> SourceSpec:
    """Write the demo arrays as ``.npy`` files in ``folder`` and describe them."""
    X, y = make_demo_arrays()
    paths = []
    for name, arr in (("X", X), ("y", y)):
        path = os.path.join(folder, f"demo_{name}.npy")
        np.save(path, arr)
        paths.append(FieldSpec(name, "npy", path))
    meta = {
        "description": "synthetic 10-class Gaussian clusters, 64 features",
        "class_names": [f"class_{i}" for i in range(DEMO_CLASSES)],
    }
    return SourceSpec("demo", tuple(paths), meta)
