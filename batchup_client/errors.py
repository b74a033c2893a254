"""The client's exceptions. No ``zmq.ZMQError`` escapes the client.

Hierarchy::

    BatchupError
    ├── ProtocolViolation        the server sent bytes that do not follow PROTOCOL.md
    ├── ConnectionLost           the server is unreachable, died, or reclaimed this client
    ├── AuthenticationError      the CURVE handshake failed: key not authorised, wrong server key,
    │                            or one side uses CURVE and the other not (also a PermissionError)
    ├── ClientClosed             you closed this client (or its stream) and then used it
    ├── BatchupTimeout           no answer within the timeout (also a TimeoutError)
    └── RemoteError              the server refused a request or a batch failed there
        ├── VersionMismatchError     incompatible protocol versions
        ├── UnknownSourceError       no such source / array (also a LookupError)
        ├── InvalidArgumentError     a request argument is illegal (also a ValueError)
        ├── UnsupportedDtypeError    an array dtype outside the allow-list (also a TypeError)
        ├── TooLargeError            above a size limit (also a ValueError)
        ├── UnauthorizedError        wrong token, or code the server does not run (also a
        │                            PermissionError)
        ├── DatasetNotReady          the server is fetching that dataset; ask again later
        ├── DatasetUnavailableError  a standard dataset cannot be had (also a RuntimeError,
        │                            which batchup's dataset classes raise)
        └── RemoteException          code on the server raised; carries its type and traceback
"""

from __future__ import annotations

from batchup_protocol import ErrorCode

__all__ = [
    "AuthenticationError",
    "BatchupError",
    "BatchupTimeout",
    "ClientClosed",
    "ConnectionLost",
    "DatasetNotReady",
    "DatasetUnavailableError",
    "InvalidArgumentError",
    "ProtocolViolation",
    "RemoteError",
    "RemoteException",
    "TooLargeError",
    "UnauthorizedError",
    "UnknownSourceError",
    "UnsupportedDtypeError",
    "VersionMismatchError",
    "remote_error",
]


class BatchupError(Exception):
    """Base of every error the service raises."""


class ProtocolViolation(BatchupError):
    """The server sent something that does not follow the protocol."""


class ConnectionLost(BatchupError):
    """The server went away or stopped answering heartbeats."""


class AuthenticationError(BatchupError, PermissionError):
    """The security handshake with the server failed (CurveZMQ): this client's key is not
    among the server's authorised keys, the server key given is not the server's, or one
    side uses CURVE and the other does not. The message names the address and the fix."""


class ClientClosed(BatchupError):
    """The client (or stream) was closed by this process before this use."""


class BatchupTimeout(BatchupError, TimeoutError):
    """An answer did not arrive in time."""


class RemoteError(BatchupError):
    """The server reported an error.

    Attributes:
        code: the protocol's :class:`ErrorCode`.
        remote_type: the exception type name on the server, when one was raised there.
        remote_traceback: the server-side traceback text, when there is one.
    """

    def __init__(self, code: int, message: str, remote_type: str = "", remote_traceback: str = ""):
        super().__init__(message)
        self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else code
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nServer-side traceback:\n" + self.remote_traceback
        return text


class VersionMismatchError(RemoteError):
    """Client and server speak incompatible protocol versions."""


class UnknownSourceError(RemoteError, LookupError):
    """No source (or uploaded array) with that name."""


class InvalidArgumentError(RemoteError, ValueError):
    """The server rejected an argument."""


class UnsupportedDtypeError(RemoteError, TypeError):
    """An array's dtype cannot travel on the wire."""


class TooLargeError(RemoteError, ValueError):
    """A batch or message exceeds the server's size limit."""


class RemoteException(RemoteError):
    """Code running on the server raised while preparing a batch."""


class UnauthorizedError(RemoteError, PermissionError):
    """The server refuses this client: a wrong token, or client code it does not run."""


class DatasetNotReady(RemoteError):
    """The server is downloading or converting the dataset (clients wait and ask again)."""


class DatasetUnavailableError(RemoteError, RuntimeError):
    """A standard dataset is not cached on the server and cannot be fetched now."""


_BY_CODE: dict[int, type[RemoteError]] = {
    ErrorCode.UNAUTHORIZED: UnauthorizedError,
    ErrorCode.NOT_READY: DatasetNotReady,
    ErrorCode.UNAVAILABLE: DatasetUnavailableError,
    ErrorCode.VERSION_MISMATCH: VersionMismatchError,
    ErrorCode.UNKNOWN_SOURCE: UnknownSourceError,
    ErrorCode.INVALID_ARGUMENT: InvalidArgumentError,
    ErrorCode.UNSUPPORTED_DTYPE: UnsupportedDtypeError,
    ErrorCode.TOO_LARGE: TooLargeError,
    ErrorCode.REMOTE_EXCEPTION: RemoteException,
}


def remote_error(code: int, message: str, remote_type: str = "", traceback: str = "") -> RemoteError:
    """The exception for an :class:`~batchup_protocol.Error` message."""
    cls = _BY_CODE.get(code, RemoteError)
    if cls is RemoteException and remote_type:
        message = f"{remote_type}: {message}"
    return cls(code, message, remote_type, traceback)
