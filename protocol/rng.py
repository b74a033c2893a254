"""Random-number-generator state on the wire (legacy ``RandomState`` / MT19937).

batchup shuffles with the caller's ``RandomState`` (or the global ``np.random``). The
state travels so the server draws exactly what batchup would, and comes back so the
client can leave the caller's RNG where batchup would have left it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import MalformedFrame

__all__ = ["RNGState", "decode_rng_state", "encode_rng_state", "states_equal"]

RNGState = tuple[str, "np.ndarray[Any, Any]", int, int, float]


def encode_rng_state(state: RNGState) -> dict[str, Any]:
    """``RandomState.get_state()`` → a msgpack-friendly map."""
    kind, key, pos, has_gauss, gauss = state
    return {
        "kind": str(kind),
        "key": np.asarray(key, dtype="<u4").tobytes(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def decode_rng_state(data: Any) -> RNGState:
    """Inverse of :func:`encode_rng_state`, validating every field."""
    try:
        kind, key, pos = data["kind"], data["key"], data["pos"]
        has_gauss, gauss = data["has_gauss"], data["gauss"]
    except (KeyError, TypeError) as exc:
        raise MalformedFrame(f"rng state is missing a field: {exc}") from exc
    if kind != "MT19937" or not isinstance(key, bytes) or len(key) != 624 * 4:
        raise MalformedFrame("rng state should be MT19937 with a 624-word key")
    if not (
        isinstance(pos, int) and 0 <= pos <= 624 and has_gauss in (0, 1) and not isinstance(has_gauss, float)
    ):
        raise MalformedFrame("rng state position out of range, or has_gauss not 0 or 1")
    if not isinstance(gauss, (int, float)):
        raise MalformedFrame("rng state gauss should be a float")
    return (kind, np.frombuffer(key, dtype="<u4").astype(np.uint32), pos, has_gauss, float(gauss))


def states_equal(a: Any, b: Any) -> bool:
    """Whether two ``get_state()`` tuples describe the same generator position."""
    return a[2] == b[2] and a[3] == b[3] and a[4] == b[4] and bool(np.array_equal(a[1], b[1]))
