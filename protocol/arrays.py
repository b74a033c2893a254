"""Arrays on the wire: a dtype allow-list with explicit byte order, and raw buffers.

An array travels as ``[dtype_str, shape]`` in the message header plus one raw frame
holding its C-ordered bytes. ``dtype_str`` is numpy's ``dtype.str`` (``'<f4'``,
``'|u1'``, ``'>i8'``...), so byte order is always explicit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import FrameTooLarge, MalformedFrame, UnsupportedDtype

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_NDIM",
    "SLOT_ALIGN",
    "array_from_buffer",
    "arrays_in_slot",
    "as_wire_array",
    "check_dtype",
    "dtype_from_wire",
    "slot_layout",
    "slot_owner",
    "spec_of",
]

#: kind + itemsize pairs accepted on the wire (byte order is separate).
ALLOWED_DTYPES: frozenset[str] = frozenset(
    ["b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"]
)
MAX_NDIM = 32


def check_dtype(dtype: np.dtype[Any]) -> str:
    """Return the wire string of ``dtype`` or raise :class:`UnsupportedDtype`."""
    code = f"{dtype.kind}{dtype.itemsize}"
    if dtype.fields is not None or dtype.subdtype is not None or code not in ALLOWED_DTYPES:
        raise UnsupportedDtype(
            f"dtype {dtype} cannot travel on the wire; allowed are bool, signed and "
            f"unsigned integers, float16/32/64 and complex64/128"
        )
    return dtype.str


_PARSED: dict[str, np.dtype[Any]] = {}


def dtype_from_wire(text: Any) -> np.dtype[Any]:
    """Parse a wire dtype string, checking the allow-list and the byte-order mark."""
    cached = _PARSED.get(text) if isinstance(text, str) else None
    if cached is not None:
        return cached
    dtype = _parse_dtype(text)
    _PARSED[text] = dtype  # only allowed dtypes get here: at most ~40 entries
    return dtype


def _parse_dtype(text: Any) -> np.dtype[Any]:
    if not isinstance(text, str) or len(text) < 2 or len(text) > 16 or text[0] not in "<>|":
        raise MalformedFrame(f"dtype should be like '<f4' with explicit byte order, got {text!r:.40}")
    try:
        dtype = np.dtype(text)
    except Exception as exc:  # numpy raises TypeError, ValueError or SyntaxError
        raise UnsupportedDtype(f"dtype {text!r} is not a numpy dtype") from exc
    check_dtype(dtype)
    if (text[0] == "|") != (dtype.itemsize == 1 or dtype.kind == "b"):
        raise MalformedFrame(f"dtype {text!r} has a byte-order mark that does not fit its size")
    return dtype


def spec_of(array: np.ndarray[Any, Any]) -> list[Any]:
    """The ``[dtype_str, shape]`` header entry of an array."""
    return [check_dtype(array.dtype), list(array.shape)]


def as_wire_array(array: Any) -> np.ndarray[Any, Any]:
    """``array`` as a C-contiguous ndarray (copies only when it is not one)."""
    arr = np.asarray(array)
    check_dtype(arr.dtype)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr


class _Writable:
    """Exposes a receive buffer to numpy as writable memory, keeping its owner alive.

    A received ZeroMQ frame is exclusively ours, but some pyzmq versions hand it out as
    a read-only memoryview; batchup users write into their batches, so the array must
    be writable. Only used for owners with a ``buffer`` attribute (``zmq.Frame``).
    """

    __slots__ = ("__array_interface__", "owner")

    def __init__(self, owner: Any, address: int, dtype: np.dtype[Any], shape: tuple[int, ...]):
        self.owner = owner
        self.__array_interface__ = {
            "data": (address, False),
            "typestr": dtype.str,
            "shape": shape,
            "version": 3,
        }


def array_from_buffer(buffer: Any, spec: Any, max_bytes: int, owner: Any = None) -> np.ndarray[Any, Any]:
    """Build the array described by ``spec`` over ``buffer`` without copying.

    The result is writable. ``owner`` (e.g. the ZeroMQ frame) is kept alive as long as
    the array is. Read-only buffers not owned by a ZeroMQ frame (``bytes``) are copied.
    """
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], list)):
        raise MalformedFrame(f"array spec should be [dtype, shape], got {spec!r:.80}")
    dtype = dtype_from_wire(spec[0])
    shape = spec[1]
    if len(shape) > MAX_NDIM or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise MalformedFrame(f"array shape should be at most {MAX_NDIM} sizes >= 0, got {shape!r:.80}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise FrameTooLarge(f"array of {nbytes} bytes exceeds the limit of {max_bytes} bytes")
    view = memoryview(buffer)
    if view.nbytes != nbytes:
        raise MalformedFrame(
            f"array frame should hold {nbytes} bytes for {spec[0]} {tuple(shape)}, but holds {view.nbytes}"
        )
    if nbytes == 0:
        return np.empty(shape, dtype)
    if not view.readonly:
        return np.frombuffer(view, dtype=dtype).reshape(shape)
    if owner is None or not hasattr(owner, "buffer"):
        # an immutable object (bytes): the caller's batch must be writable, so copy
        return np.frombuffer(view, dtype=dtype).reshape(shape).copy()
    address = np.frombuffer(view, dtype=np.uint8).ctypes.data
    return np.asarray(_Writable(owner, address, dtype, tuple(shape)))


SLOT_ALIGN = 64  #: byte alignment of each array inside a shared-memory slot
_BYTE = np.dtype(np.uint8)


def slot_layout(arrays: list[tuple[np.dtype[Any], tuple[int, ...]]]) -> tuple[list[list[Any]], int]:
    """Place arrays one after another in a slot: ``[[dtype_str, shape, offset], ...]`` and bytes used."""
    layout: list[list[Any]] = []
    offset = 0
    for dtype, shape in arrays:
        layout.append([check_dtype(dtype), list(shape), offset])
        nbytes = math.prod(shape) * dtype.itemsize
        offset += -(-nbytes // SLOT_ALIGN) * SLOT_ALIGN
    return layout, offset


def arrays_in_slot(
    buffer: Any, base: int, layout: Any, slot_bytes: int, owner: Any, address: int | None = None
) -> list[np.ndarray[Any, Any]]:
    """Writable views of the arrays a :func:`slot_layout` placed at ``buffer[base:]``.

    ``owner`` is kept alive by every view (the slot is reused only once it is collected;
    :func:`slot_owner` finds it again). ``address``: where ``buffer`` starts in memory, if
    the caller knows it (a mapping's address does not change). Raises
    :class:`MalformedFrame` when the layout does not fit inside the slot.
    """
    if not isinstance(layout, list):
        raise MalformedFrame("batch layout should be a list of [dtype, shape, offset]")
    if address is None:
        address = np.frombuffer(buffer, dtype=np.uint8).ctypes.data
    placed = []
    end = 0
    for entry in layout:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], int)):
            raise MalformedFrame(f"layout entry should be [dtype, shape, offset], got {entry!r:.60}")
        dtype = dtype_from_wire(entry[0])
        shape = entry[1]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise MalformedFrame(f"layout shape should be sizes >= 0, got {shape!r:.60}")
        nbytes = math.prod(shape) * dtype.itemsize
        offset = entry[2]
        if offset < 0 or offset + nbytes > slot_bytes:
            raise MalformedFrame(
                f"array of {nbytes} bytes at offset {offset} overflows a {slot_bytes}-byte slot"
            )
        placed.append((dtype, shape, offset, nbytes))
        end = max(end, offset + nbytes)
    # one array over the slot's bytes holds the owner; each batch array is a view of it
    whole = np.asarray(_Writable(owner, address + base, _BYTE, (end,))) if end else None
    out = []
    for dtype, shape, offset, nbytes in placed:
        if whole is None or nbytes == 0:
            out.append(np.empty(shape, dtype))
        else:
            out.append(whole[offset : offset + nbytes].view(dtype).reshape(shape))
    return out


def slot_owner(array: Any) -> Any:
    """The ``owner`` :func:`arrays_in_slot` gave ``array`` (``None`` for any other array)."""
    base = getattr(array, "base", None)
    while isinstance(base, np.ndarray):
        base = base.base
    return base.owner if isinstance(base, _Writable) else None
