"""CurveZMQ keys and the server's security rules (pure logic and key files; no sockets).

* :func:`keygen` writes a key pair (``NAME.key`` public, ``NAME.key_secret`` secret, 0600).
* :func:`load_server_keys` reads the server's key pair and checks its folder of
  authorised client public keys.
* :func:`is_loopback_endpoint` decides the secure-by-default rule: a server bound beyond
  loopback (or ipc) needs CURVE keys, or an explicit ``--insecure``.
* :func:`code_trust` decides whether clients' functions (``ds.map(fn)``) may run.

The sockets themselves are made CURVE servers in :mod:`batchup_server.router`.
"""

from __future__ import annotations

import dataclasses
import glob
import ipaddress
import os

import zmq.auth

__all__ = [
    "CurveKeys",
    "KeyFileError",
    "code_trust",
    "insecure_bind_message",
    "is_loopback_endpoint",
    "keygen",
    "load_server_keys",
]

#: bind hosts that only this machine can reach
_LOCAL_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


class KeyFileError(ValueError):
    """A key file or key folder is missing or unusable."""


@dataclasses.dataclass(frozen=True)
class CurveKeys:
    """The server's CURVE key pair (z85 bytes) and the folder of authorised client keys.

    Picklable: worker processes receive it at spawn (through a pipe, not the command line).
    """

    public: bytes
    secret: bytes
    clients_dir: str

    def __repr__(self) -> str:  # never print the secret
        return f"CurveKeys(public={self.public.decode()!r}, clients_dir={self.clients_dir!r})"


def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether only this host can reach ``endpoint``: ``ipc://``/``inproc://``, or tcp on
    127.0.0.0/8, ``::1`` or ``localhost``. ``tcp://0.0.0.0``, ``tcp://*`` and any other
    name or interface count as reachable from the network."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.strip("[]").lower()
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: not provably local


def insecure_bind_message(bind: str) -> str:
    """Why a server refuses ``bind`` without keys, and how to fix it."""
    return (
        f"refusing to serve {bind} without CURVE authentication: every host that can reach it "
        "could read all sources, upload data, and (with --trust-client-code) run code here.\n"
        "Create keys and pass them:\n"
        "  batchup-server keygen server --dir keys             # the server's key pair\n"
        "  batchup-server keygen alice --dir alice-keys        # on each client's host; then copy\n"
        "  mkdir -p keys/clients && cp alice-keys/alice.key keys/clients/   # its PUBLIC key here\n"
        f"  batchup-server --bind {bind} --curve-secret-key keys/server.key_secret "
        "--curve-clients keys/clients\n"
        "  (clients: connect(address, server_key='keys/server.key', client_key='alice.key_secret'), "
        "or BATCHUP_SERVER_KEY / BATCHUP_CLIENT_KEY)\n"
        "Or bind a loopback address (tcp://127.0.0.1:PORT) or an ipc:// path, or pass --insecure "
        "to serve without authentication or encryption on a network you trust."
    )


def keygen(name: str, directory: str, force: bool = False) -> tuple[str, str]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) in ``directory``; return
    their paths. Refuses to overwrite an existing pair unless ``force``."""
    if not name or os.sep in name or name.startswith("."):
        raise KeyFileError(f"key name should be a plain file name, got {name!r}")
    os.makedirs(directory, exist_ok=True)
    public, secret = (os.path.join(directory, name + ext) for ext in (".key", ".key_secret"))
    existing = [p for p in (public, secret) if os.path.exists(p)]
    if existing and not force:
        raise KeyFileError(f"{', '.join(existing)} already exist(s); pass --force to replace the key pair")
    for path in existing:
        os.unlink(path)
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        made_public, made_secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(made_secret, 0o600)
    os.chmod(made_public, 0o644)
    return str(made_public), str(made_secret)


def load_server_keys(secret_file: str, clients_dir: str) -> CurveKeys:
    """Read the server's key pair from its ``_secret`` file and check the clients folder."""
    if bool(secret_file) != bool(clients_dir):
        raise KeyFileError(
            "CURVE needs both --curve-secret-key (the server's NAME.key_secret) and --curve-clients "
            "(a folder of authorised clients' NAME.key files)"
        )
    public, secret = _read_pair(secret_file, "--curve-secret-key")
    if secret is None:
        raise KeyFileError(
            f"--curve-secret-key {secret_file} holds only a public key; pass the NAME.key_secret file"
        )
    if not os.path.isdir(clients_dir):
        raise KeyFileError(
            f"--curve-clients {clients_dir} is not a folder (of authorised clients' .key files)"
        )
    return CurveKeys(public, secret, os.path.abspath(clients_dir))


def client_key_files(clients_dir: str) -> list[str]:
    """The public key files ZAP will accept (pyzmq reads ``*.key`` in the folder)."""
    return sorted(glob.glob(os.path.join(clients_dir, "*.key")))


def _read_pair(path: str, what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{what} {path}: cannot read a CURVE key file ({exc})") from exc
    return public, secret


def code_trust(trust_flag: bool, bind: str, curve: bool) -> tuple[bool, str]:
    """Whether the server runs clients' functions, and if not, why (for the refusal).

    ``--trust-client-code`` applies only to clients that can be told apart from anyone on
    the network: every client of a CURVE server (ZAP checked its key), or any client of a
    loopback/ipc server. An anonymous client of a server bound beyond loopback
    (``--insecure``) is never trusted.
    """
    if not trust_flag:
        return False, "this server does not run client code"
    if curve or is_loopback_endpoint(bind):
        return True, ""
    return False, (
        f"this server is bound to {bind} without CURVE authentication (--insecure), so it does not "
        "run code from anonymous clients even with --trust-client-code; start it with "
        "--curve-secret-key and --curve-clients so that only authorised clients can reach it"
    )
