"""``batchup-server``: serve mini-batches of named data sources over ZeroMQ."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import DEFAULT_BIND, ConfigError, load_config
from .plugins import PluginError
from .security import KeyFileError, keygen
from .sources import SourceError

__all__ = ["main"]

DESCRIPTION = f"""\
Serve mini-batches of data sources to batchup_client training scripts over ZeroMQ.

With no arguments the server serves the built-in "demo" source on {DEFAULT_BIND}.
Sources come from a TOML file (--config): .npy files (memory-mapped), .npz archives
and datasets inside HDF5 files, each a list of equally long arrays ("fields").

The standard datasets (mnist, fashion_mnist, svhn, svhn_extra, cifar10, cifar100,
stl10, usps) are served by name from batchup's cache (<home>/data/, home from
~/.batchup.cfg [paths] data_dir, else $BATCHUP_HOME, else ~/.batchup).

Across hosts, clients and server authenticate each other and encrypt everything with
CurveZMQ: create key pairs with `batchup-server keygen`, start the server with
--curve-secret-key and --curve-clients, and give clients the server's public key and
their own key pair. A server bound to anything but loopback (127.0.0.0/8, ::1,
localhost) or an ipc:// path refuses to start without keys, unless --insecure.

Subcommands:
  batchup-server keygen NAME      write a CurveZMQ key pair NAME.key / NAME.key_secret
  batchup-server ping ADDRESS     exit 0 when a server answers a handshake at ADDRESS
  batchup-server fetch NAME...    download, verify and convert datasets into the cache
  batchup-server datasets         list the known datasets, which are cached, and sizes
"""

EPILOG = """\
examples:
  batchup-server
  batchup-server --bind tcp://127.0.0.1:5555 --config server.toml --workers 2
  batchup-server --bind ipc:///tmp/batchup.sock --log-level debug
  batchup-server ping tcp://127.0.0.1:5555
  batchup-server keygen server --dir keys
  batchup-server --bind tcp://0.0.0.0:5555 --curve-secret-key keys/server.key_secret \\
                 --curve-clients keys/clients
  batchup-server fetch cifar10 mnist
  batchup-server --download          (fetch a dataset on a client's first request)

SIGINT or SIGTERM stops the server cleanly: workers are reaped, sockets closed and
its shared-memory folder removed."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="batchup-server",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--bind",
        metavar="ENDPOINT",
        help=f"ZeroMQ endpoint for the control socket (default {DEFAULT_BIND}; "
        "tcp://HOST:0 picks a free port, printed on the ready line)",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file naming sources and [server] options")
    p.add_argument(
        "--workers", type=int, metavar="N", help="worker processes that gather batches (default 2)"
    )
    p.add_argument(
        "--client-timeout",
        type=float,
        metavar="SECONDS",
        help="reclaim the streams of a client silent this long (default 30)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between heartbeats each way (default 1)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        metavar="BYTES",
        help="largest batch or upload chunk served or accepted (default 1 GiB)",
    )
    p.add_argument("--token", help="require clients to present this token in their handshake")
    p.add_argument(
        "--curve-secret-key",
        metavar="FILE",
        help="the server's CurveZMQ key pair (a NAME.key_secret file from `batchup-server keygen`): "
        "with --curve-clients, every socket that talks to clients authenticates and encrypts",
    )
    p.add_argument(
        "--curve-clients",
        metavar="DIR",
        help="folder of the public keys (NAME.key files) of the clients allowed to connect; "
        "any other client gets an authentication error; re-read when its files change",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow binding beyond loopback (e.g. tcp://0.0.0.0:5555) without CURVE keys: anyone "
        "who reaches the port can read every source, and batches travel in clear text; "
        "client code is never run for such anonymous clients",
    )
    p.add_argument(
        "--health-bind",
        metavar="ENDPOINT",
        help="also answer handshakes (and nothing else) on this loopback or ipc endpoint, "
        "without keys, so `batchup-server ping ENDPOINT` and container health checks work "
        "when the control endpoint requires CURVE keys (e.g. tcp://127.0.0.1:5556)",
    )
    p.add_argument(
        "--trust-client-code",
        action="store_true",
        default=None,
        help="run the functions clients ship for ds.map(fn) in the workers (unpickled with "
        "cloudpickle: only for clients you trust, their code runs with this server's rights); "
        "without it, only the named transforms of --plugin modules run here",
    )
    p.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE",
        dest="plugins",
        help="import MODULE, whose @transform and @source functions clients can then name "
        "(ds.map('name', ...), [sources.x] plugin = 'name'); repeatable",
    )
    p.add_argument("--no-demo", action="store_true", help="do not serve the built-in demo source")
    p.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="download and convert a standard dataset on the first request for it "
        "(default: only serve datasets already in the cache; see `batchup-server fetch`)",
    )
    p.add_argument(
        "--data-dir",
        metavar="HOME",
        help="batchup home holding data/<dataset>.h5 (default: ~/.batchup.cfg, $BATCHUP_HOME, ~/.batchup)",
    )
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging verbosity on stderr (default info)",
    )
    return p


def _ping(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="batchup-server ping", description="Exit 0 when a server answers a handshake."
    )
    p.add_argument("address", help="the server's control endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    p.add_argument("--token", default="", help="token, if the server requires one")
    p.add_argument(
        "--server-key", metavar="FILE", help="the server's public key (CURVE; default $BATCHUP_SERVER_KEY)"
    )
    p.add_argument(
        "--client-key",
        metavar="FILE",
        help="this client's NAME.key_secret (CURVE; default $BATCHUP_CLIENT_KEY)",
    )
    args = p.parse_args(argv)
    from batchup_client import BatchupError, connect

    try:
        with connect(
            args.address,
            timeout=args.timeout,
            token=args.token,
            server_key=args.server_key,
            client_key=args.client_key,
        ) as client:
            print(f"ok: {args.address} answered (server {client.server_id}, sources {client.sources})")
    except (BatchupError, ValueError) as exc:
        print(f"batchup-server ping: {exc}", file=sys.stderr)
        return 1
    return 0


KEYGEN_HELP = """Write a CurveZMQ key pair: NAME.key (public; share it) and NAME.key_secret (secret,
mode 0600; keep it on this host).

The server's pair:      batchup-server keygen server --dir keys
                        batchup-server --bind tcp://0.0.0.0:5555 \\
                            --curve-secret-key keys/server.key_secret --curve-clients keys/clients
                        (give clients keys/server.key)
Each client's pair:     batchup-server keygen alice --dir alice-keys     (on the client's host)
                        copy alice-keys/alice.key into the server's keys/clients folder, then
                        batchup_client.connect("tcp://HOST:5555", server_key="server.key",
                                               client_key="alice-keys/alice.key_secret")
                        or set BATCHUP_SERVER_KEY=server.key BATCHUP_CLIENT_KEY=alice-keys/alice.key_secret
"""


def _keygen(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="batchup-server keygen",
        description=KEYGEN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help="file name of the pair, e.g. server or alice")
    p.add_argument("--dir", default=".", metavar="DIR", help="folder to write into (default: here)")
    p.add_argument("--force", action="store_true", help="replace an existing pair of that name")
    args = p.parse_args(argv)
    try:
        public, secret = keygen(args.name, args.dir, args.force)
    except (KeyFileError, OSError) as exc:
        print(f"batchup-server keygen: error: {exc}", file=sys.stderr)
        return 2
    print(f"public key: {public}  (share it)")
    print(f"secret key: {secret}  (mode 0600; keep it on this host)")
    print()
    print("if this is the server's pair (give clients the public key):")
    print(
        f"  batchup-server --bind tcp://0.0.0.0:5555 --curve-secret-key {secret} --curve-clients CLIENTS_DIR"
    )
    print("if this is a client's pair (copy the public key into the server's CLIENTS_DIR first):")
    print(f'  batchup_client.connect("tcp://HOST:5555", server_key="server.key", client_key="{secret}")')
    print(f"  or: export BATCHUP_SERVER_KEY=server.key BATCHUP_CLIENT_KEY={secret}")
    return 0


def _dataset_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", metavar="FILE", help="TOML file whose [datasets] table sets home and mirrors")
    p.add_argument("--data-dir", metavar="HOME", help="batchup home (default: as batchup finds it)")
    return p


def _fetch(argv: list[str]) -> int:
    from .datasets.catalog import DATASETS, UnknownDatasetError, lookup
    from .datasets.store import DatasetStore, DatasetUnavailable

    p = _dataset_parser(
        "batchup-server fetch",
        "Download the standard datasets' files (resuming, retrying, trying each mirror), verify "
        "their SHA-256, and convert them into one HDF5 file each in the cache. A dataset "
        f"already cached is not fetched again. Known: {', '.join(DATASETS)}.",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="datasets to fetch ('all' for every one)")
    p.add_argument("--verify", action="store_true", help="re-read cached files against their SHA-256")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    _log_to_stderr("info")
    try:
        store = DatasetStore(load_config(args.config, data_home=args.data_dir).datasets)
        names = list(DATASETS) if args.names == ["all"] else args.names
        infos = [lookup(n) for n in names]
    except (ConfigError, UnknownDatasetError) as exc:
        print(f"batchup-server fetch: error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for info in infos:
        if args.verify and store.cached(info):
            problem = store.verify(info)
            if problem:
                print(f"{info.name}: cached file is damaged ({problem}); fetching again")
                store.delete(info)
        try:
            path = store.fetch(info, progress=not args.quiet)
            print(f"{info.name}: {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
        except DatasetUnavailable as exc:
            print(f"batchup-server fetch: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _datasets(argv: list[str]) -> int:
    from .datasets.store import DatasetStore

    p = _dataset_parser("batchup-server datasets", "List the standard datasets, which are cached, and sizes.")
    args = p.parse_args(argv)
    try:
        store = DatasetStore(load_config(args.config, data_home=args.data_dir).datasets)
    except ConfigError as exc:
        print(f"batchup-server datasets: error: {exc}", file=sys.stderr)
        return 2
    print(f"cache: {store.data_dir}")
    print(f"{'name':<14}{'cached':<8}{'size':>10}  {'download':>9}  {'splits':<28}title")
    for row in store.status():
        size = f"{row['size'] / 2**20:.1f} MiB" if row["cached"] else "-"
        print(
            f"{row['name']:<14}{'yes' if row['cached'] else 'no':<8}{size:>10}  "
            f"~{row['download_bytes'] / 2**20:>4.0f} MiB  {','.join(row['splits']):<28}{row['title']}"
        )
    return 0


def _log_to_stderr(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s batchup-server[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"ping": _ping, "fetch": _fetch, "datasets": _datasets, "keygen": _keygen}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    args = _parser().parse_args(argv)
    _log_to_stderr(args.log_level)
    try:
        config = load_config(
            args.config,
            bind=args.bind,
            workers=args.workers,
            client_timeout=args.client_timeout,
            heartbeat_interval=args.heartbeat_interval,
            max_message_bytes=args.max_message_bytes,
            token=args.token,
            trust_client_code=args.trust_client_code,
            plugins=args.plugins,
            parent_pid=args.parent_pid,
            demo=False if args.no_demo else None,
            download=args.download,
            data_home=args.data_dir,
            curve_secret_key=args.curve_secret_key,
            curve_clients=args.curve_clients,
            insecure=args.insecure,
            health_bind=args.health_bind,
        )
        from .server import serve

        return serve(config)
    except (ConfigError, SourceError, PluginError) as exc:
        print(f"batchup-server: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"batchup-server: error: {exc}", file=sys.stderr)
        return 1
