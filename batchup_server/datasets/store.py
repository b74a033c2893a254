"""The dataset cache: where converted files live, fetching them, and checking them.

Files live where batchup keeps them: ``<home>/data/<name>.h5``, with home taken from
``~/.batchup.cfg`` (``[paths] data_dir``), else ``$BATCHUP_HOME``, else ``~/.batchup``.
Downloads go to ``<home>/data/temp/<dataset>/`` (one folder per dataset, so MNIST and
Fashion-MNIST, whose files share names, cannot mix) and are deleted once converted.

A conversion writes ``<name>.h5.partial`` and renames it into place only when complete,
next to a manifest (``<name>.h5.manifest.json``: size and SHA-256) used to detect a
damaged cache. One fetch per file at a time, across processes (``flock``).
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

from .catalog import DATASETS, DatasetInfo
from .download import DiskFullError, DownloadError, RemoteFile, fetch_file, sha256_file
from .layout import check_layout

__all__ = ["DatasetSettings", "DatasetStore", "DatasetUnavailable", "batchup_home"]

log = logging.getLogger("batchup_server.datasets")
MANIFEST_FORMAT = 1


class DatasetUnavailable(Exception):
    """A dataset is neither cached nor obtainable (downloads off or failed, disk full...)."""


def batchup_home() -> str:
    """batchup's home folder: ``~/.batchup.cfg`` ``[paths] data_dir``, else ``$BATCHUP_HOME``,
    else ``~/.batchup`` (the same order as batchup 0.2.3; evaluated on each call)."""
    cfg_path = os.path.expanduser("~/.batchup.cfg")
    parser = configparser.RawConfigParser()
    if os.path.exists(cfg_path):
        try:
            parser.read(cfg_path)
        except configparser.Error as exc:
            log.warning("ignoring %s: %s", cfg_path, exc)
    try:
        home = parser.get("paths", "data_dir")
    except (configparser.Error, KeyError):
        home = os.environ.get("BATCHUP_HOME", "~/.batchup")
    return os.path.abspath(os.path.expanduser(home))


@dataclasses.dataclass(frozen=True)
class DatasetSettings:
    """The ``[datasets]`` table of a server config."""

    home: str = ""  #: batchup home; "" = batchup's rule (see :func:`batchup_home`)
    download: bool = False  #: may a client's request download a dataset that is not cached?
    builtin_mirrors: bool = True  #: try the built-in URLs after the configured mirrors
    mirrors: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  #: dataset -> base URLs
    sha256: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  #: dataset -> file -> sum
    timeout: float = 30.0  #: seconds without progress before a download try fails
    attempts: int = 3  #: tries per URL


class DatasetStore:
    """Finds, checks and fetches the converted HDF5 files of the standard datasets."""

    def __init__(self, settings: DatasetSettings | None = None):
        self.settings = settings or DatasetSettings()
        self.home = self.settings.home or batchup_home()
        self.data_dir = os.path.join(self.home, "data")

    # ------------------------------------------------------------------ where things are
    def path(self, info: DatasetInfo) -> str:
        return os.path.join(self.data_dir, info.h5_filename)

    def manifest_path(self, info: DatasetInfo) -> str:
        return self.path(info) + ".manifest.json"

    def remote_files(self, info: DatasetInfo) -> list[RemoteFile]:
        """Each source file with its URLs: configured mirrors first, then the built-in ones."""
        bases = list(self.settings.mirrors.get(info.name, ()))
        if self.settings.builtin_mirrors:
            bases += list(info.mirrors)
        sums = self.settings.sha256.get(info.name, {})
        return [
            RemoteFile(
                f.filename,
                tuple(b + ("" if b.endswith("/") else "/") + f.filename for b in bases),
                sums.get(f.filename, f.sha256),
            )
            for f in info.files
        ]

    # ------------------------------------------------------------------ checking the cache
    def problem(self, info: DatasetInfo) -> str:
        """Why the cached file cannot be served ("" when it can; "missing" when absent)."""
        path = self.path(info)
        if not os.path.isfile(path):
            return "missing"
        size = os.path.getsize(path)
        manifest = self._manifest(info)
        if manifest is not None and manifest.get("size") != size:
            return f"its size is {size} bytes, but {manifest.get('size')} were written"
        return check_layout(info, path)

    def _manifest(self, info: DatasetInfo) -> dict[str, Any] | None:
        try:
            with open(self.manifest_path(info)) as f:
                manifest = json.load(f)
            return manifest if isinstance(manifest, dict) else {}
        except FileNotFoundError:
            return None  # converted elsewhere (e.g. by batchup itself): judged by its layout alone
        except (OSError, ValueError):
            return {}

    def cached(self, info: DatasetInfo) -> str | None:
        """The path of a sound cached copy; a damaged one is deleted (and logged)."""
        problem = self.problem(info)
        if not problem:
            return self.path(info)
        if problem != "missing":
            log.warning("cached %s at %s is damaged (%s); deleting it", info.name, self.path(info), problem)
            self.delete(info)
        return None

    def verify(self, info: DatasetInfo) -> str:
        """A full check, reading every byte against the manifest's SHA-256 ("" = sound)."""
        problem = self.problem(info)
        if problem:
            return problem
        manifest = self._manifest(info)
        if manifest is None:
            return ""  # nothing to compare with; the layout was checked
        if sha256_file(self.path(info)) != manifest.get("sha256"):
            return "its SHA-256 differs from the one recorded when it was converted"
        return ""

    def delete(self, info: DatasetInfo) -> None:
        for p in (self.path(info), self.manifest_path(info)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)

    # ------------------------------------------------------------------ fetching
    def fetch(
        self, info: DatasetInfo, progress: bool = True, on_stage: Callable[[str], None] | None = None
    ) -> str:
        """The path of the converted dataset, downloading and converting it if needed.

        Raises :class:`DatasetUnavailable` with a message that says what to do.
        """
        path = self.cached(info)
        if path is not None:
            return path
        stage = on_stage or (lambda _text: None)
        os.makedirs(self.data_dir, exist_ok=True)
        with self._lock(info):
            path = self.cached(info)  # another process may have finished it meanwhile
            if path is not None:
                return path
            temp = os.path.join(self.data_dir, "temp", info.name)
            sources: dict[str, str] = {}
            for remote in self.remote_files(info):
                stage(f"downloading {remote.filename}")
                sources[remote.filename] = self._download(info, remote, temp, progress)
            stage("converting")
            self._convert(info, sources, progress)
            shutil.rmtree(temp, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(temp))  # data/temp, when no other dataset uses it
            return self.path(info)

    def _download(self, info: DatasetInfo, remote: RemoteFile, folder: str, progress: bool) -> str:
        if not remote.urls:
            raise DatasetUnavailable(
                f"{info.name} is not cached at {self.path(info)} and no download URL is configured "
                f"for {remote.filename}: add mirrors in the [datasets] config, or copy the file "
                f"{remote.filename} to {folder}/"
            )
        try:
            return fetch_file(
                remote,
                folder,
                timeout=self.settings.timeout,
                attempts=self.settings.attempts,
                progress=progress,
            )
        except DiskFullError as exc:
            raise DatasetUnavailable(f"{info.name}: {exc}") from exc
        except DownloadError as exc:
            raise DatasetUnavailable(
                f"{info.name} is not cached and could not be downloaded: {exc}\n"
                f"Run `batchup-server fetch {info.name}` on a machine with access and copy "
                f"{info.h5_filename} to {self.data_dir}/, or place {remote.filename} in {folder}/."
            ) from exc

    def _convert(self, info: DatasetInfo, sources: dict[str, str], progress: bool) -> None:
        import h5py

        from .formats import CONVERTERS

        path = self.path(info)
        partial = path + ".partial"
        start = time.monotonic()
        log.info("converting %s into %s", info.name, path)
        try:
            with h5py.File(partial, "w") as out:
                CONVERTERS[info.converter](sources, out, progress)
                problem = check_layout(info, partial)
            if problem:
                raise DatasetUnavailable(f"{info.name}: the converted file is not usable: {problem}")
            manifest = {
                "format": MANIFEST_FORMAT,
                "dataset": info.name,
                "size": os.path.getsize(partial),
                "sha256": sha256_file(partial),
            }
            with open(self.manifest_path(info) + ".partial", "w") as f:
                json.dump(manifest, f, indent=1)
            os.replace(self.manifest_path(info) + ".partial", self.manifest_path(info))
            os.replace(partial, path)
        except OSError as exc:
            if exc.errno == errno.ENOSPC or "No space left" in str(exc):
                free = shutil.disk_usage(self.data_dir).free
                raise DatasetUnavailable(
                    f"disk full while converting {info.name} into {self.data_dir} ({free} bytes free)"
                ) from exc
            raise
        finally:
            for p in (partial, self.manifest_path(info) + ".partial"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
        log.info("%s ready at %s (%.1f s)", info.name, path, time.monotonic() - start)

    @contextlib.contextmanager
    def _lock(self, info: DatasetInfo) -> Iterator[None]:
        with open(self.path(info) + ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ listing
    def status(self) -> list[dict[str, Any]]:
        """One row per known dataset: name, title, cached or not, size on disk."""
        rows = []
        for info in DATASETS.values():
            path = self.path(info)
            exists = os.path.isfile(path)
            rows.append(
                {
                    "name": info.name,
                    "title": info.title,
                    "cached": exists,
                    "path": path,
                    "size": os.path.getsize(path) if exists else 0,
                    "download_bytes": info.download_bytes,
                    "splits": list(info.splits),
                }
            )
        return rows
