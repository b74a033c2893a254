"""Content keys of client arrays, recomputed cheaply at each ``batch_iterator()`` call.

batchup reads the live arrays, so a script that updates ``y`` in place between epochs
(pseudo-labelling) sees the new labels. Arrays up to :data:`FULL_HASH_BYTES` are
re-hashed at every call; larger ones are re-hashed only when a strided sample of
their bytes changed (PROTOCOL.md, "Client arrays").
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from batchup_protocol.host import content_key

__all__ = ["FULL_HASH_BYTES", "KeyCache"]

FULL_HASH_BYTES = 16 << 20
SAMPLE_BYTES = 1 << 20


def _sample_digest(arr: np.ndarray[Any, Any]) -> bytes:
    flat = arr.reshape(-1).view(np.uint8)
    step = max(1, flat.nbytes // SAMPLE_BYTES)
    h = hashlib.sha256(np.ascontiguousarray(flat[::step]).data)
    h.update(flat[-4096:].tobytes())
    return h.digest()


class KeyCache:
    """Remembers the content key of each array object, to skip re-hashing big arrays."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Any, ...]] = {}

    def key(self, arr: np.ndarray[Any, Any]) -> str:
        if arr.nbytes <= FULL_HASH_BYTES or not arr.flags.c_contiguous:
            return content_key(arr)
        ident = (arr.ctypes.data, arr.shape, arr.strides, arr.dtype.str)
        sample = _sample_digest(arr)
        cached = self._cache.get(id(arr))
        if cached is not None and cached[0] == ident and cached[1] == sample:
            return str(cached[2])
        key = content_key(arr)
        self._cache[id(arr)] = (ident, sample, key)
        return key
