"""Server lifecycle: runtime folders, sources, workers, the router loop, clean shutdown."""

from __future__ import annotations

import faulthandler
import functools
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
import tempfile
from typing import Any

import numpy as np

from batchup_protocol.host import host_id, mark_owned, sweep_stale

from .config import ConfigError, ServerConfig
from .demo import write_demo_source
from .plugins import load_plugins
from .router import Router, worker_main
from .security import CurveKeys, KeyFileError, client_key_files, is_loopback_endpoint, load_server_keys
from .sources import FieldSpec, SourceError, SourceSpec, plugin_fields

__all__ = ["serve"]

log = logging.getLogger("batchup_server")
SHM_ROOT = "/dev/shm"
PREFIX = "batchup-"


def _make_dirs() -> tuple[str, str]:
    tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    runtime = tempfile.mkdtemp(prefix=tag + "-")
    mark_owned(runtime)
    shm_root = SHM_ROOT if os.access(SHM_ROOT, os.W_OK) else runtime
    for root in {shm_root, tempfile.gettempdir()}:
        for path in sweep_stale(root, PREFIX):
            log.info("removed %s left by a process that died", path)
    shm = os.path.join(shm_root, tag if shm_root == SHM_ROOT else "shm")
    os.makedirs(shm, mode=0o700)
    mark_owned(shm)
    return runtime, shm


def _extract_npz(name: str, path: str, keys: list[str] | None, folder: str) -> SourceSpec:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"source {name!r}: cannot read {path}: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ConfigError(
            f"source {name!r}: {path} is a .npy file, not an .npz archive (use npy = {{ ... }})"
        )
    with archive:
        names = keys if keys is not None else list(archive.files)
        missing = [k for k in names if k not in archive.files]
        if missing:
            raise ConfigError(f"source {name!r}: {path} has no array(s) {missing}; it has {archive.files}")
        fields = []
        for key in names:
            out = os.path.join(folder, f"npz-{name}-{key}.npy")
            np.save(out, archive[key])
            fields.append(FieldSpec(key, "npy", out))
    return SourceSpec(name, tuple(fields))


def _plugin_source(name: str, kind: str, args: dict[str, Any]) -> SourceSpec:
    try:
        names = plugin_fields(kind, args)
    except SourceError as exc:
        raise ConfigError(f"source {name!r}: {exc}") from None
    key = json.dumps(args, sort_keys=True)
    return SourceSpec(name, tuple(FieldSpec(field, "plugin", kind, key) for field in names))


def _spawn_worker(
    index: int,
    task_endpoint: str,
    results_endpoint: str,
    plugins: tuple[str, ...] = (),
    curve: CurveKeys | None = None,
) -> Any:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=worker_main,
        args=(index, task_endpoint, results_endpoint, os.getpid(), tuple(plugins), curve),
        name=f"batchup-worker-{index}",
        daemon=True,
    )
    proc.start()
    return proc


def _security(config: ServerConfig) -> CurveKeys | None:
    """The server's CURVE keys (None without), after saying in the log how clients are checked."""
    if not config.curve:
        if not is_loopback_endpoint(config.bind):  # only with --insecure (ServerConfig checks)
            log.warning(
                "INSECURE: serving %s without CURVE authentication or encryption (--insecure): every "
                "host that can reach it may read all sources and upload data, and sees batches in clear "
                "text; clients' code is not run. See `batchup-server keygen --help`.",
                config.bind,
            )
        return None
    try:
        keys = load_server_keys(config.curve_secret_key, config.curve_clients)
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from None
    authorised = client_key_files(keys.clients_dir)
    log.info(
        "CURVE: server public key %s; %d authorised client key(s) in %s",
        keys.public.decode(),
        len(authorised),
        keys.clients_dir,
    )
    if not authorised:
        log.warning("CURVE: %s holds no NAME.key file, so no client can connect", keys.clients_dir)
    return keys


def serve(config: ServerConfig, ready_file: Any = sys.stdout) -> int:
    """Run a server until SIGINT/SIGTERM (or its parent dies). Returns an exit code."""
    curve = _security(config)
    runtime, shm = _make_dirs()
    router: Router | None = None
    try:
        sources = dict(config.sources)
        for name, (path, keys) in config.npz.items():
            sources[name] = _extract_npz(name, path, keys, runtime)
        if config.demo:
            sources["demo"] = write_demo_source(runtime)
        load_plugins(config.plugins)
        for name, (kind, args) in config.plugin_sources.items():
            sources[name] = _plugin_source(name, kind, args)
        server_id = secrets.token_hex(8)
        spawn = functools.partial(_spawn_worker, plugins=config.plugins, curve=curve)
        router = Router(config, sources, runtime, shm, server_id, host_id(), spawn, curve)
        if config.trust_client_code and not router.functions.trusts:
            log.warning("--trust-client-code is ignored: %s", router.functions.refusal)

        def stop(signum: int, _frame: Any) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            assert router is not None
            router.stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        # `kill -USR1 PID` prints every thread's stack to stderr (a server that does not stop)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        log.info(
            "serving %d source(s) %s on %s with %d worker(s)",
            len(sources),
            sorted(sources),
            router.endpoint,
            config.workers,
        )
        if router.health_endpoint:
            log.info("health endpoint (handshakes only, no keys) on %s", router.health_endpoint)
        print(f"batchup-server ready on {router.endpoint}", file=ready_file, flush=True)
        router.run()
        return 0
    finally:
        if router is not None:
            router.close()
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
        # (a server that never started says why, after this, and nothing else)
        (log.info if router is not None else log.debug)("stopped; removed %s and %s", runtime, shm)
