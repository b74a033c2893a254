"""Server lifecycle: runtime folders, sources, workers, the router loop, clean shutdown."""

from __future__ import annotations

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

from batchup_protocol.host import host_id, sweep_stale

from .config import ConfigError, ServerConfig
from .demo import write_demo_source
from .plugins import load_plugins
from .router import Router, worker_main
from .sources import FieldSpec, SourceError, SourceSpec, plugin_fields

__all__ = ["serve"]

log = logging.getLogger("batchup_server")
SHM_ROOT = "/dev/shm"
PREFIX = "batchup-"


def _make_dirs() -> tuple[str, str]:
    tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    runtime = tempfile.mkdtemp(prefix=tag + "-")
    shm_root = SHM_ROOT if os.access(SHM_ROOT, os.W_OK) else runtime
    for root in {shm_root, tempfile.gettempdir()}:
        for path in sweep_stale(root, PREFIX):
            log.info("removed %s left by a process that died", path)
    shm = os.path.join(shm_root, tag if shm_root == SHM_ROOT else "shm")
    os.makedirs(shm, mode=0o700)
    return runtime, shm


def _extract_npz(name: str, path: str, keys: list[str] | None, folder: str) -> SourceSpec:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"source {name!r}: cannot read {path}: {exc}") from exc
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
    index: int, task_endpoint: str, results_endpoint: str, plugins: tuple[str, ...] = ()
) -> Any:
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=worker_main,
        args=(index, task_endpoint, results_endpoint, os.getpid(), tuple(plugins)),
        name=f"batchup-worker-{index}",
        daemon=True,
    )
    proc.start()
    return proc


def serve(config: ServerConfig, ready_file: Any = sys.stdout) -> int:
    """Run a server until SIGINT/SIGTERM (or its parent dies). Returns an exit code."""
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
        spawn = functools.partial(_spawn_worker, plugins=config.plugins)
        router = Router(config, sources, runtime, shm, server_id, host_id(), spawn)

        def stop(signum: int, _frame: Any) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            assert router is not None
            router.stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        log.info(
            "serving %d source(s) %s on %s with %d worker(s)",
            len(sources),
            sorted(sources),
            router.endpoint,
            config.workers,
        )
        print(f"batchup-server ready on {router.endpoint}", file=ready_file, flush=True)
        router.run()
        return 0
    finally:
        if router is not None:
            router.close()
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
        log.info("stopped; removed %s and %s", runtime, shm)
