"""Identity helpers shared by both sides: which host am I on, what is this array's key."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from typing import Any

import numpy as np

__all__ = [
    "OWNER_FILE",
    "ContentHasher",
    "content_key",
    "host_id",
    "make_private_dir",
    "mark_owned",
    "sweep_stale",
    "tune_malloc",
]


def host_id() -> str:
    """Hostname plus kernel boot id: equal on both sides only when they share a host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


class ContentHasher:
    """Incremental content key: ``sha256(dtype_str + shape + C-ordered bytes)``."""

    def __init__(self, dtype_str: str, shape: list[int] | tuple[int, ...]):
        self._h = hashlib.sha256(f"{dtype_str}{list(shape)}".encode())

    def update(self, data: Any) -> None:
        self._h.update(data)

    def key(self) -> str:
        return "sha256:" + self._h.hexdigest()


def content_key(array: np.ndarray[Any, Any]) -> str:
    """The content key of a whole array (what uploads and shared files are keyed by)."""
    arr = np.ascontiguousarray(array)
    hasher = ContentHasher(arr.dtype.str, arr.shape)
    hasher.update(arr.reshape(-1).view(np.uint8).data)
    return hasher.key()


#: in every private folder of a server or client: ``"<pid> <start time>"`` of its owner
OWNER_FILE = ".batchup-owner"


def _process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, Linux; "" elsewhere): with the
    pid it names one process, as pids are reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        return text[text.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return ""


def mark_owned(path: str) -> None:
    """Make ``path`` (a folder this process made) one :func:`sweep_stale` may remove
    after this process is gone."""
    pid = os.getpid()
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        f.write(f"{pid} {_process_start(pid)}\n")


def make_private_dir(prefix: str, root: str | None = None) -> str:
    """A new folder ``<root>/<prefix><pid>-<random>``, marked as this process's."""
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root)
    mark_owned(path)
    return path


def _gone(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        pass  # it exists (another user's): its start time tells whether it is ours
    now = _process_start(pid)
    return bool(start and now and now != start)


#: the names folders had before owner files (and have until one is written): a server's
#: runtime and shared-memory folders, a client's and an embedded server's launcher's
_UNMARKED = re.compile(r"batchup-(?:(\d+)-[0-9a-f]{8}(?:-[a-z0-9_]{8})?|(?:client|local)-(\d+)-[a-z0-9_]{8})")


def _owner(path: str, name: str) -> tuple[int, str] | None:
    """The process that made folder ``path`` (``root/name``), if it is one of this
    user's: named in its owner file, or in its exact name from before owner files (never
    a folder like ``batchup-experiments-2023``)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return None
    try:
        with open(os.path.join(path, OWNER_FILE)) as f:
            pid, _, start = f.read().strip().partition(" ")
        return int(pid), start
    except FileNotFoundError:
        m = _UNMARKED.fullmatch(name)
        return None if m is None else (int(m.group(1) or m.group(2)), "")
    except (OSError, ValueError):
        return None


def sweep_stale(root: str, prefix: str = "batchup-") -> list[str]:
    """Remove the folders ``root/<prefix>...`` that a server or client made
    (:func:`make_private_dir`, :func:`mark_owned`) and whose process is gone.

    A killed process cannot clean up: the next one to start does. Only folders of this
    user that carry the owner file are touched, or that have the exact name such folders
    had before owner files (a process killed before it wrote one, or an older version),
    never another folder with a like name. Returns what was removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        path = os.path.join(root, name)
        owner = _owner(path, name)
        if owner is not None and _gone(*owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ---------------------------------------------------------------------- heap tuning
# Every batch is a few MiB: a received ZeroMQ message on the client, a gathered array in a
# worker. glibc serves such sizes with fresh ``mmap`` regions and returns them on free, so
# each batch pays a page fault per 4 KiB page plus the kernel zeroing it (measured here:
# ~250 faults and ~0.5 ms of system time per CIFAR batch of 256, a quarter of the
# throughput). Raising the mmap and trim thresholds keeps freed buffers for reuse.
# ``BATCHUP_MALLOC_TUNING=0`` turns this off.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Apply the thresholds once per process (glibc only); returns whether they were set."""
    global _done
    if _done or os.environ.get("BATCHUP_MALLOC_TUNING", "1") == "0":
        return _done
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    _done = ok
    return ok
