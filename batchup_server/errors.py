"""Server-side exceptions that become :class:`batchup_protocol.Error` replies."""

from __future__ import annotations

from batchup_protocol import ErrorCode

__all__ = ["RequestError"]


class RequestError(Exception):
    """A client request cannot be served; the router answers it with ``Error(code, str(self))``."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
