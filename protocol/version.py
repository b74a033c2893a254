"""Protocol version and the compatibility rule checked at the handshake."""

from __future__ import annotations

__all__ = ["PROTOCOL_VERSION", "is_compatible"]

#: (major, minor). Minor bumps only add optional fields or message types;
#: anything else bumps major. See PROTOCOL.md, "Evolution".
PROTOCOL_VERSION: tuple[int, int] = (1, 2)


def is_compatible(peer: tuple[int, int]) -> bool:
    """Peers speak to each other when their major versions are equal."""
    return peer[0] == PROTOCOL_VERSION[0]
