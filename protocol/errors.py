"""Errors raised while encoding or decoding the wire format.

Hierarchy::

    ProtocolError                  anything wrong with bytes on the wire
    ├── MalformedFrame             not msgpack, missing/extra frames, bad field types
    ├── UnknownMessage             a well-formed header naming a type we do not know
    ├── VersionMismatch            peer speaks an incompatible protocol major version
    ├── UnsupportedDtype           an array dtype outside the allow-list
    └── FrameTooLarge              a header, array or message above the size limits
"""

from __future__ import annotations

__all__ = [
    "FrameTooLarge",
    "MalformedFrame",
    "ProtocolError",
    "UnknownMessage",
    "UnsupportedDtype",
    "VersionMismatch",
]


class ProtocolError(Exception):
    """Bytes received (or about to be sent) do not follow PROTOCOL.md."""


class MalformedFrame(ProtocolError):
    """A frame could not be decoded, or a field has the wrong type."""


class UnknownMessage(ProtocolError):
    """The header's ``type`` names no message of this protocol version."""


class VersionMismatch(ProtocolError):
    """The peer's protocol major version differs from ours."""


class UnsupportedDtype(ProtocolError, TypeError):
    """An array's dtype is not on the allow-list (object, void, strings...)."""


class FrameTooLarge(ProtocolError, ValueError):
    """A frame or a whole message exceeds the configured size limit."""
