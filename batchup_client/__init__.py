"""batchup's mini-batch API, served by a ``batchup-server`` over ZeroMQ.

>>> import batchup_client
>>> client = batchup_client.connect()            # a private local server
>>> train = client.source("demo")
>>> for X, y in train.batch_iterator(batch_size=64, shuffle=np.random.RandomState(1)):
...     pass

``from batchup_client import data_source`` is a drop-in for ``batchup.data_source``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from . import data_source, distributed, sampling, work_pool
from .batch_map import batch_map_concat, batch_map_mean
from .connection import Client as _ConnectionClient
from .errors import (
    AuthenticationError,
    BatchupError,
    BatchupTimeout,
    ClientClosed,
    ConnectionLost,
    DatasetNotReady,
    DatasetUnavailableError,
    InvalidArgumentError,
    ProtocolViolation,
    RemoteError,
    RemoteException,
    TooLargeError,
    UnauthorizedError,
    UnknownSourceError,
    UnsupportedDtypeError,
    VersionMismatchError,
)
from .fanout import FanoutClient
from .keys import load_client_keys
from .local import LocalServer
from .remote import RemoteDataSource, SourceMethods

__all__ = [
    "AuthenticationError",
    "BatchupError",
    "BatchupTimeout",
    "Client",
    "ClientClosed",
    "ConnectionLost",
    "DatasetNotReady",
    "DatasetUnavailableError",
    "InvalidArgumentError",
    "ProtocolViolation",
    "RemoteDataSource",
    "RemoteError",
    "RemoteException",
    "TooLargeError",
    "UnauthorizedError",
    "UnknownSourceError",
    "UnsupportedDtypeError",
    "VersionMismatchError",
    "batch_map_concat",
    "batch_map_mean",
    "connect",
    "data_source",
    "default_client",
    "distributed",
    "sampling",
    "work_pool",
]


class Client(SourceMethods, _ConnectionClient):
    """A connection to a batchup-server, with batchup-style sources."""


def connect(
    address: str | list[str] | tuple[str, ...] | None = None,
    *,
    timeout: float = 10.0,
    token: str = "",
    workers: int | None = None,
    server_timeout: float | None = None,
    share_memory: bool | None = None,
    server_key: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    client_key: str | os.PathLike[str] | None = None,
) -> Client:
    """Connect to the batchup-server at ``address`` (``tcp://host:port`` or ``ipc://path``).

    Several addresses (a list, or one string with commas) give a client whose streams are
    made by all those servers together (:mod:`batchup_client.fanout`): the same batches,
    in the same order, as from one server; a server lost mid-epoch costs a short stall.

    With no address, start a private local server for this process (stopped when the
    client closes or the process exits). ``share_memory=False`` forces chunked uploads of
    client arrays even when the server shares this host.

    A server started with CURVE keys needs ``server_key`` (the server's public ``NAME.key``
    file) and ``client_key`` (this client's ``NAME.key_secret``, whose public half is in the
    server's ``--curve-clients`` folder); without the arguments ``$BATCHUP_SERVER_KEY`` and
    ``$BATCHUP_CLIENT_KEY`` name those files. Every socket then authenticates and encrypts;
    a key the server refuses raises :class:`AuthenticationError`. Servers with key pairs of
    their own take one ``server_key`` per address, in the same order (a list, or in
    ``$BATCHUP_SERVER_KEY`` paths separated by commas); one key serves every address.
    """
    if address is not None and not isinstance(address, str):
        if not isinstance(address, list | tuple) or not all(isinstance(a, str) for a in address):
            raise TypeError(
                f"address should be a string like 'tcp://host:5555', or a list of them, got {address!r:.80}"
            )
        if not address:
            raise ValueError("connect() got an empty list of addresses (None starts a private local server)")
    addresses = address.split(",") if isinstance(address, str) else address
    if addresses is None or not addresses:
        if server_key is not None or client_key is not None:
            raise ValueError(
                "server_key and client_key are for a server at an address; connect() "
                "without one starts a private local server, which needs no keys"
            )
        server = LocalServer(workers=workers)
        try:
            return Client(
                server.endpoint,
                timeout=timeout,
                token=token,
                server_timeout=server_timeout,
                on_close=server.stop,
                share_memory=share_memory,
            )
        except BaseException:
            server.stop()
            raise
    if server_key is None and client_key is None:
        server_key = os.environ.get("BATCHUP_SERVER_KEY") or None
        client_key = os.environ.get("BATCHUP_CLIENT_KEY") or None
    addresses = [a.strip() for a in addresses if a.strip()]
    curves = {a: load_client_keys(k, client_key) for a, k in _server_keys(addresses, server_key).items()}
    if len(curves) > 1:
        return FanoutClient(  # type: ignore[return-value]
            list(curves),
            curves=curves,
            timeout=timeout,
            token=token,
            server_timeout=server_timeout,
            share_memory=share_memory,
        )
    curve = next(iter(curves.values()))
    return Client(
        addresses[0],
        timeout=timeout,
        token=token,
        server_timeout=server_timeout,
        share_memory=share_memory,
        curve=curve,
    )


def _server_keys(
    addresses: list[str], server_key: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None
) -> dict[str, str | os.PathLike[str] | None]:
    """Each address's server key file: one for all, or one per address in order (a list, or
    paths separated by commas as in ``$BATCHUP_SERVER_KEY``; a string that names an existing
    file is that one file)."""
    if not addresses:
        raise ValueError("connect() needs at least one address")
    keys: list[str | os.PathLike[str] | None]
    if server_key is None:
        keys = [None]
    elif isinstance(server_key, str) and not os.path.isfile(os.path.expanduser(server_key)):
        keys = [k.strip() for k in server_key.split(",") if k.strip()] or [None]
    elif isinstance(server_key, str):
        keys = [server_key]  # one file, even if its name has a comma
    elif isinstance(server_key, os.PathLike):
        keys = [server_key]
    else:
        keys = list(server_key)
    if len(keys) == 1:
        keys = keys * len(addresses)
    if len(keys) != len(addresses):
        raise ValueError(
            f"server_key names {len(keys)} key files for {len(addresses)} addresses; give one "
            "key for every server, or one per address in the same order"
        )
    out: dict[str, str | os.PathLike[str] | None] = {}
    for address, key in zip(addresses, keys, strict=True):
        if address in out and out[address] != key:
            raise ValueError(f"{address} is given twice, with different server keys")
        out[address] = key
    return out


_default: Client | None = None
_default_pid = 0  #: the process that made ``_default`` (a forked child makes its own)
_default_lock = threading.Lock()


def default_client() -> Client:
    """The process-wide client used by drop-in sources.

    ``$BATCHUP_SERVER`` names a running server (with ``$BATCHUP_SERVER_KEY`` and
    ``$BATCHUP_CLIENT_KEY`` when it requires CURVE keys); otherwise a private local server
    starts on first use. It is closed at interpreter exit. A forked child (a DataLoader
    worker, say) gets one of its own: the parent's sockets do not survive the fork.
    """
    global _default, _default_pid
    with _default_lock:
        if _default is None or _default.closed or _default_pid != os.getpid():
            address = os.environ.get("BATCHUP_SERVER") or None
            _default = connect(address)
            _default_pid = os.getpid()  # closed at exit with every client left open
        return _default
