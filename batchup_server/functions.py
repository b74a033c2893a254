"""The functions a stream's ``map`` may apply: transforms that plugins registered, and
trusted clients' own functions.

A client's function arrives pickled (``RegisterCode``, keyed by its SHA-256). It is kept
here as bytes and never unpickled in the router: only workers load it, ahead of the tasks
that use it. No sockets here.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

import batchup_protocol as proto
from batchup_protocol import ErrorCode

from .errors import RequestError
from .plugins import Registry
from .security import code_trust

__all__ = ["FunctionTable"]


class FunctionTable:
    """Plugin transforms (``registry``) and the functions trusted clients registered."""

    def __init__(self, registry: Registry, trust_flag: bool, bind: str, curve: bool):
        self.registry = registry
        self.trust_flag = trust_flag  #: --trust-client-code was given
        #: whether clients' functions run here (--trust-client-code, and only for clients that
        #: are authenticated or local); the reason given when they do not
        self.trusts, self.refusal = code_trust(trust_flag, bind, curve)
        self.code: dict[str, tuple[bytes, str]] = {}  #: key -> (pickled function, its name)

    def register(self, msg: proto.RegisterCode, arrays: list[Any]) -> None:
        """Keep a trusted client's pickled function (never unpickled here: workers do)."""
        if not self.trusts:
            named = ", ".join(sorted(self.registry.transforms)) or "none"
            if self.trust_flag:  # trusted in principle, but these clients are anonymous
                how = self.refusal
            else:
                how = (
                    "this server does not run client code: start the server with --trust-client-code "
                    "(or trust_client_code = true under [server]) if you trust every client that can "
                    "reach it"
                )
            raise RequestError(
                ErrorCode.UNAUTHORIZED,
                f"cannot run {msg.name or 'that function'} for ds.map(fn): {how}; or map with a "
                f"transform a plugin registered, ds.map('name', ...) (this server has: {named})",
            )
        if len(arrays) != 1 or arrays[0].dtype != np.uint8 or arrays[0].ndim != 1:
            raise RequestError(ErrorCode.MALFORMED, "register_code should carry one 1-D uint8 array")
        payload = arrays[0].tobytes()
        if msg.key != "sha256:" + hashlib.sha256(payload).hexdigest():
            raise RequestError(ErrorCode.INVALID_ARGUMENT, "register_code: the bytes do not match the key")
        self.code[msg.key] = (payload, msg.name)

    def check(self, transforms: Any) -> list[dict[str, Any]]:
        """A stream's ``transforms`` as sent, once each names a function this server has."""
        if not isinstance(transforms, list) or not all(isinstance(t, dict) for t in transforms):
            raise RequestError(ErrorCode.MALFORMED, "transforms should be a list of maps")
        for t in transforms:
            if set(t) == {"code"} and isinstance(t["code"], str):
                if t["code"] not in self.code:
                    raise RequestError(
                        ErrorCode.INVALID_ARGUMENT, f"no function registered with key {t['code']}"
                    )
            elif set(t) <= {"name", "params"} and isinstance(t.get("name"), str):
                if not isinstance(t.get("params", {}), dict):
                    raise RequestError(ErrorCode.MALFORMED, "a transform's params should be a map")
                try:
                    self.registry.transform(t["name"])
                except KeyError as exc:
                    raise RequestError(ErrorCode.INVALID_ARGUMENT, str(exc.args[0])) from None
            else:
                raise RequestError(
                    ErrorCode.MALFORMED,
                    f"a transform is {{'code': key}} or {{'name': str, 'params': map}}, got {t}",
                )
        return transforms
