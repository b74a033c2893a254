"""Protocol version and the compatibility rule checked at the handshake."""

from __future__ import annotations

from typing import Any

__all__ = [
    "AHEAD_SINCE",
    "BUNDLES_SINCE",
    "PROTOCOL_VERSION",
    "SUPERSEDES_SINCE",
    "TELLS_CREDIT_SINCE",
    "is_compatible",
    "knows_supersedes",
    "opens_ahead",
    "takes_bundles",
    "tells_credit_limit",
]

#: (major, minor). Minor bumps only add optional fields or message types;
#: anything else bumps major. See PROTOCOL.md, "Evolution".
PROTOCOL_VERSION: tuple[int, int] = (1, 6)

#: the first version whose clients decode bundles on the data socket
BUNDLES_SINCE: tuple[int, int] = (1, 3)
#: the first version whose clients free the slot a batch made again supersedes
SUPERSEDES_SINCE: tuple[int, int] = (1, 4)
#: the first version whose servers say in Welcome how much batch credit they accept
TELLS_CREDIT_SINCE: tuple[int, int] = (1, 5)
#: the first version whose servers tell a plan's final RNG state (EndOfStream.final_rng)
#: and take OpenStream.start_credit: what a stream opened ahead needs
AHEAD_SINCE: tuple[int, int] = (1, 6)


def is_compatible(peer: tuple[int, int]) -> bool:
    """Peers speak to each other when their major versions are equal."""
    return peer[0] == PROTOCOL_VERSION[0]


def _at_least(peer: Any, version: tuple[int, int]) -> bool:
    try:
        return (int(peer[0]), int(peer[1])) >= version
    except (TypeError, ValueError, IndexError):
        return False


def takes_bundles(peer: Any) -> bool:
    """Whether a client that sent ``Hello.version == peer`` decodes bundles (1.3)."""
    return _at_least(peer, BUNDLES_SINCE)


def knows_supersedes(peer: Any) -> bool:
    """Whether a client that sent ``Hello.version == peer`` frees the slot named by
    ``Batch.supersedes`` (1.4); an older one would leave that slot in use for ever."""
    return _at_least(peer, SUPERSEDES_SINCE)


def tells_credit_limit(peer: Any) -> bool:
    """Whether a server whose ``Welcome.version == peer`` sends its ``max_credit_batches``
    (1.5); an older one's limit is a server option the client cannot see."""
    return _at_least(peer, TELLS_CREDIT_SINCE)


def opens_ahead(peer: Any) -> bool:
    """Whether a server whose ``Welcome.version == peer`` tells ``EndOfStream.final_rng``
    and takes ``OpenStream.start_credit`` (1.6): a client opens streams ahead only then."""
    return _at_least(peer, AHEAD_SINCE)
