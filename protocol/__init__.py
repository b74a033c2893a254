"""The batchup-service wire protocol (installed as ``batchup_protocol``).

See PROTOCOL.md beside this file. This package is the only code that knows bytes,
frames, message types and versions; client and server both import it.
"""

from __future__ import annotations

from .arrays import ALLOWED_DTYPES, array_from_buffer, check_dtype, dtype_from_wire
from .errors import (
    FrameTooLarge,
    MalformedFrame,
    ProtocolError,
    UnknownMessage,
    UnsupportedDtype,
    VersionMismatch,
)
from .framing import Limits, decode, encode
from .messages import *  # noqa: F403
from .messages import __all__ as _messages_all
from .rng import decode_rng_state, encode_rng_state, states_equal
from .version import PROTOCOL_VERSION, is_compatible

__all__ = sorted(
    [
        "ALLOWED_DTYPES",
        "FrameTooLarge",
        "Limits",
        "MalformedFrame",
        "PROTOCOL_VERSION",
        "ProtocolError",
        "UnknownMessage",
        "UnsupportedDtype",
        "VersionMismatch",
        "array_from_buffer",
        "check_dtype",
        "decode",
        "decode_rng_state",
        "dtype_from_wire",
        "encode",
        "encode_rng_state",
        "is_compatible",
        "states_equal",
        *_messages_all,
    ]
)
