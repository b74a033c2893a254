"""Datasets as the router sees them: a request names one, the answer is a source, or
"not ready" while a background thread downloads and converts it.

The router's loop must never block on a download, so a fetch runs on a thread of its
own and requests for that dataset are answered ``NOT_READY`` (with what it is doing)
until it ends; clients ask again. A fetch that failed is reported as ``UNAVAILABLE``
for :data:`RETRY_AFTER` seconds, then the next request tries again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
import time
from typing import Any

from ..sources import SourceSpec
from .catalog import DatasetInfo, lookup
from .layout import dataset_source
from .store import DatasetStore, DatasetUnavailable

__all__ = ["DatasetNotReady", "DatasetService"]

log = logging.getLogger("batchup_server.datasets")
RETRY_AFTER = 30.0


class DatasetNotReady(Exception):
    """The dataset is being fetched; ask again shortly."""


@dataclasses.dataclass
class _Fetch:
    thread: threading.Thread
    stage: str = "starting"
    error: str = ""
    ended: float = 0.0


class DatasetService:
    """Resolves ``(dataset name, parameters)`` to a :class:`SourceSpec`, fetching on demand."""

    def __init__(self, store: DatasetStore, scratch: str, download: bool):
        self.store = store
        self.scratch = scratch
        self.download = download
        self._paths: dict[str, str] = {}  # checked once per server run
        self._specs: dict[str, SourceSpec] = {}
        self._fetches: dict[str, _Fetch] = {}
        self._lock = threading.Lock()

    def spec(self, name: str, params: dict[str, Any]) -> SourceSpec:
        """The source for a request. Raises ``UnknownDatasetError``, ``DatasetRequestError``,
        :class:`DatasetNotReady` or :class:`DatasetUnavailable`."""
        info = lookup(name)
        path = self._path(info)
        key = json.dumps([info.name, params], sort_keys=True, default=repr)
        spec = self._specs.get(key)
        if spec is None:
            spec = self._specs[key] = dataset_source(info, path, params, self.scratch)
        return spec

    def _path(self, info: DatasetInfo) -> str:
        path = self._paths.get(info.name)
        if path is not None:
            return path
        with self._lock:
            fetch = self._fetches.get(info.name)
            if fetch is not None and fetch.thread.is_alive():
                raise DatasetNotReady(
                    f"the server is fetching {info.name} ({fetch.stage}); ask again shortly"
                )
            if fetch is not None and fetch.error and time.monotonic() - fetch.ended < RETRY_AFTER:
                raise DatasetUnavailable(fetch.error)
            self._fetches.pop(info.name, None)
        path = self.store.cached(info)
        if path is not None:
            self._paths[info.name] = path
            return path
        if not self.download:
            raise DatasetUnavailable(
                f"{info.name} is not cached in {self.store.data_dir} and this server does not download "
                f"datasets: run `batchup-server fetch {info.name}` (on a machine with access, then copy "
                f"{info.h5_filename} there), or start the server with --download"
            )
        self._start(info)
        raise DatasetNotReady(f"the server started fetching {info.name}; ask again shortly")

    def _start(self, info: DatasetInfo) -> None:
        fetch = _Fetch(
            threading.Thread(target=self._run, args=(info,), name=f"fetch-{info.name}", daemon=True)
        )
        with self._lock:
            self._fetches[info.name] = fetch
        log.info("fetching %s for a client's request", info.name)
        fetch.thread.start()

    def _run(self, info: DatasetInfo) -> None:
        fetch = self._fetches[info.name]

        def stage(text: str) -> None:
            fetch.stage = text

        try:
            self.store.fetch(info, progress=sys.stderr.isatty(), on_stage=stage)
            log.info("%s is ready", info.name)
        except DatasetUnavailable as exc:
            fetch.error = str(exc)
            log.error("%s", exc)
        except Exception as exc:  # a bug or an unexpected file: report it to clients, keep serving
            fetch.error = f"fetching {info.name} failed: {type(exc).__name__}: {exc}"
            log.exception("fetching %s failed", info.name)
        fetch.ended = time.monotonic()

    def fetching(self) -> list[str]:
        """Datasets with a fetch in progress."""
        with self._lock:
            return [n for n, f in self._fetches.items() if f.thread.is_alive()]
