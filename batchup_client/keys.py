"""CURVE keys on the client: reading key files, and what a failed handshake means.

``batchup-server keygen NAME`` writes ``NAME.key`` (the public half) and
``NAME.key_secret`` (both halves). A client needs the server's public key and its own
pair; :mod:`batchup_client.connection` puts them on its sockets.
"""

from __future__ import annotations

import dataclasses
import os

import zmq
import zmq.auth

__all__ = ["CurveClientKeys", "handshake_failure", "load_client_keys"]


@dataclasses.dataclass(frozen=True)
class CurveClientKeys:
    """A CURVE client's keys (z85 bytes): the server's public key and this client's pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # never print the secret
        return f"CurveClientKeys(server={self.server_public.decode()!r}, client={self.public.decode()!r})"


def load_client_keys(
    server_key: str | os.PathLike[str] | None, client_key: str | os.PathLike[str] | None
) -> CurveClientKeys | None:
    """Read the server's public key (its ``NAME.key``) and this client's pair (its
    ``NAME.key_secret``, which holds both halves). ``None`` when neither is given."""
    if server_key is None and client_key is None:
        return None
    if server_key is None or client_key is None:
        raise ValueError(
            "CURVE needs both server_key (the server's NAME.key) and client_key (this client's "
            f"NAME.key_secret), but got server_key={server_key!r}, client_key={client_key!r}"
        )
    server_public, _ = _read_key_file(server_key, "server_key")
    public, secret = _read_key_file(client_key, "client_key")
    if secret is None:
        raise ValueError(
            f"client_key {os.fspath(client_key)} holds only a public key; pass this client's "
            "NAME.key_secret file (written by `batchup-server keygen NAME`)"
        )
    return CurveClientKeys(server_public, public, secret)


def _read_key_file(path: str | os.PathLike[str], what: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(os.path.expanduser(os.fspath(path)))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {os.fspath(path)}: cannot read a CURVE key file ({exc})") from exc


def handshake_failure(address: str, event: int, curve: CurveClientKeys | None) -> str:
    """What a failed security handshake with ``address`` means, and what to do."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and curve is not None:
        return (
            f"the batchup-server at {address} refused this client's CURVE key (public key "
            f"{curve.public.decode()}): it is not among the server's authorised client keys; copy "
            "this client's NAME.key into the server's --curve-clients folder"
        )
    if curve is not None:
        return (
            f"the CURVE handshake with {address} failed: server_key is not the public key of the "
            "server there, or that server does not use CURVE (then connect without keys, or start "
            "it with --curve-secret-key and --curve-clients)"
        )
    return (
        f"the security handshake with {address} failed: the server there requires CURVE "
        "authentication (or is not a batchup-server); pass server_key= (the server's NAME.key) "
        "and client_key= (this client's NAME.key_secret) to batchup_client.connect(), or set "
        "BATCHUP_SERVER_KEY and BATCHUP_CLIENT_KEY"
    )
