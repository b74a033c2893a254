"""Multipart framing: ``[header, *array_frames]``; on the data socket (1.3) a bundle of
several such messages back to back.

The header is a msgpack map (the message's fields, its ``type`` and, when arrays
follow, ``arrays``: one ``[dtype_str, shape]`` per following frame). Array frames are
raw C-ordered bytes, sent with ``copy=False`` and viewed with numpy on receipt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from .arrays import array_from_buffer, as_wire_array, spec_of
from .errors import FrameTooLarge, MalformedFrame
from .messages import message_from_fields

__all__ = ["Limits", "decode", "decode_bundle", "encode", "encode_bundle", "encode_header"]


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Size limits applied when decoding (PROTOCOL.md, "Limits")."""

    max_header_bytes: int = 1 << 20
    max_array_bytes: int = 1 << 31
    max_arrays: int = 1024
    max_bundle: int = 256  #: messages in one bundle (1.3)


DEFAULT_LIMITS = Limits()


_LAYOUTS: dict[type[Any], tuple[tuple[str, bool, Any], ...]] = {}


def _layout(cls: type[Any]) -> tuple[tuple[str, bool, Any], ...]:
    """Per field: name, whether it is left out at its default (see ``_since``), the default."""
    layout = _LAYOUTS.get(cls)
    if layout is None:
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            out.append((f.name, "since" in f.metadata, default))
        layout = _LAYOUTS[cls] = tuple(out)
    return layout


def encode_header(msg: Any, specs: Sequence[list[Any]] = ()) -> bytes:
    """The msgpack header of ``msg`` (fields in declaration order, then ``arrays``); fields a
    minor version added are left out while they hold their default."""
    fields: dict[str, Any] = {"type": msg.TYPE}
    for name, optional, default in _layout(type(msg)):
        value = getattr(msg, name)
        if optional and value == default:
            continue
        fields[name] = value
    if specs:
        fields["arrays"] = list(specs)
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


def encode(msg: Any, arrays: Sequence[Any] = ()) -> list[Any]:
    """Frames for ``msg`` and its arrays; array frames are the arrays themselves (no copy)."""
    wire = [as_wire_array(a) for a in arrays]
    return [encode_header(msg, [spec_of(a) for a in wire]), *wire]


def _buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> tuple[Any, list[np.ndarray[Any, Any]]]:
    """Decode frames (``bytes`` or ``zmq.Frame``) into ``(message, arrays)``.

    Raises :class:`MalformedFrame`, :class:`UnknownMessage`, :class:`FrameTooLarge`
    or :class:`UnsupportedDtype` with a message naming what was wrong.
    """
    if not frames:
        raise MalformedFrame("a message needs at least a header frame, got 0 frames")
    msg, arrays, end = _decode_at(frames, 0, limits)
    if end != len(frames):
        raise MalformedFrame(f"header announces {end - 1} array frames but {len(frames) - 1} follow it")
    return msg, arrays


def encode_bundle(items: Sequence[tuple[Any, Sequence[Any]]]) -> list[Any]:
    """One data-socket message carrying several ``(message, arrays)`` back to back (1.3)."""
    return [frame for msg, arrays in items for frame in encode(msg, arrays)]


def decode_bundle(
    frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS
) -> list[tuple[Any, list[np.ndarray[Any, Any]]]]:
    """Decode a data-socket message: one or more messages back to back, each a header and
    the array frames it announces (PROTOCOL.md, "Bundles"). Raises as :func:`decode`."""
    if not frames:
        raise MalformedFrame("a message needs at least a header frame, got 0 frames")
    items: list[tuple[Any, list[np.ndarray[Any, Any]]]] = []
    start = 0
    while start < len(frames):
        if len(items) == limits.max_bundle:
            raise FrameTooLarge(f"a bundle of more than {limits.max_bundle} messages")
        msg, arrays, start = _decode_at(frames, start, limits)
        items.append((msg, arrays))
    return items


def _decode_at(
    frames: Sequence[Any], start: int, limits: Limits
) -> tuple[Any, list[np.ndarray[Any, Any]], int]:
    """The message whose header is ``frames[start]``, and where the next one starts."""
    header = memoryview(_buffer(frames[start]))
    if header.nbytes > limits.max_header_bytes:
        raise FrameTooLarge(f"header of {header.nbytes} bytes exceeds the limit of {limits.max_header_bytes}")
    try:
        fields = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedFrame(f"header is not a msgpack map: {exc}") from exc
    if not isinstance(fields, dict):
        raise MalformedFrame(f"header should be a msgpack map, got {type(fields).__name__}")
    specs = fields.get("arrays", [])
    if not isinstance(specs, list):
        raise MalformedFrame(f"'arrays' should be a list of [dtype, shape] specs, got {specs!r:.60}")
    if len(specs) > limits.max_arrays:
        raise FrameTooLarge(f"{len(specs)} arrays exceed the limit of {limits.max_arrays}")
    end = start + 1 + len(specs)
    if end > len(frames):
        raise MalformedFrame(
            f"header announces {len(specs)} array frames but {len(frames) - start - 1} follow it"
        )
    msg = message_from_fields(fields)
    arrays = [
        array_from_buffer(_buffer(f), spec, limits.max_array_bytes, owner=f)
        for spec, f in zip(specs, frames[start + 1 : end])
    ]
    return msg, arrays, end
