"""``batchup-server``: serve mini-batches of named data sources over ZeroMQ."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import DEFAULT_BIND, ConfigError, load_config
from .sources import SourceError

__all__ = ["main"]

DESCRIPTION = f"""\
Serve mini-batches of data sources to batchup_client training scripts over ZeroMQ.

With no arguments the server serves the built-in "demo" source on {DEFAULT_BIND}.
Sources come from a TOML file (--config): .npy files (memory-mapped), .npz archives
and datasets inside HDF5 files, each a list of equally long arrays ("fields").

Subcommands:
  batchup-server ping ADDRESS     exit 0 when a server answers a handshake at ADDRESS
"""

EPILOG = """\
examples:
  batchup-server
  batchup-server --bind tcp://127.0.0.1:5555 --config server.toml --workers 2
  batchup-server --bind ipc:///tmp/batchup.sock --log-level debug
  batchup-server ping tcp://127.0.0.1:5555

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
    p.add_argument("--no-demo", action="store_true", help="do not serve the built-in demo source")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "ping":
        return _ping(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s batchup-server[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(
            args.config,
            bind=args.bind,
            workers=args.workers,
            client_timeout=args.client_timeout,
            heartbeat_interval=args.heartbeat_interval,
            max_message_bytes=args.max_message_bytes,
            token=args.token,
            parent_pid=args.parent_pid,
            demo=False if args.no_demo else None,
        )
        from .server import serve

        return serve(config)
    except (ConfigError, SourceError) as exc:
        print(f"batchup-server: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"batchup-server: error: {exc}", file=sys.stderr)
        return 1
