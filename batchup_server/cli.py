"""``batchup-server``: serve mini-batches of named data sources over ZeroMQ."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import DEFAULT_BIND, ConfigError, load_config
from .plugins import PluginError
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

Subcommands:
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
    args = p.parse_args(argv)
    from batchup_client import BatchupError, connect

    try:
        with connect(args.address, timeout=args.timeout, token=args.token) as client:
            print(f"ok: {args.address} answered (server {client.server_id}, sources {client.sources})")
    except BatchupError as exc:
        print(f"batchup-server ping: {exc}", file=sys.stderr)
        return 1
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
    commands = {"ping": _ping, "fetch": _fetch, "datasets": _datasets}
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
        )
        from .server import serve

        return serve(config)
    except (ConfigError, SourceError, PluginError) as exc:
        print(f"batchup-server: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"batchup-server: error: {exc}", file=sys.stderr)
        return 1
