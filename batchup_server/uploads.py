"""Client arrays held by the server, by content key: chunked uploads and shared files.

Pure file handling, no sockets. An upload is written into a ``.part`` file as its chunks
arrive in order, hashed on the way, and renamed to its final name only when the bytes
match the announced content key; a rejected or abandoned upload leaves nothing behind.

Arrays no open stream uses are kept for reuse (the next epoch, a restarted script) up to
a byte budget, least recently used out first (:meth:`Uploads.evict`); a client re-sends
an array the server no longer has when its request is answered ``UNKNOWN_SOURCE``.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import time
from typing import Any

import numpy as np

import batchup_protocol as proto
from batchup_protocol import ErrorCode
from batchup_protocol.host import ContentHasher, content_key

from .errors import RequestError

__all__ = ["Uploads", "check_key"]

_KEY = re.compile(r"sha256:[0-9a-f]{64}")


def check_key(key: Any) -> str:
    """A content key as :func:`batchup_protocol.host.content_key` makes them; anything
    else (a path, say: keys name files in the shared folder) is refused."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise RequestError(
            ErrorCode.INVALID_ARGUMENT, f"an array key should be 'sha256:' and 64 hex digits, got {key!r:.80}"
        )
    return key


class _Partial:
    def __init__(self, path: str, mm: np.memmap[Any, Any], hasher: ContentHasher, total: int):
        self.path, self.mm, self.hasher, self.total = path, mm, hasher, total
        self.received = 0


class Uploads:
    """Arrays clients uploaded in chunks (or wrote into the shared folder), by content key."""

    def __init__(self, folder: str, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.paths: dict[str, str] = {}
        self._partial: dict[tuple[bytes, str], _Partial] = {}
        self._sizes: dict[str, int] = {}  #: bytes of each held array's file
        self._used: dict[str, float] = {}  #: when each was last asked for (time.monotonic)
        self.held_bytes = 0  #: of every held array

    def _hold(self, key: str, path: str) -> None:
        self.paths[key] = path
        try:
            self._sizes[key] = os.path.getsize(path)
        except OSError:
            self._sizes[key] = 0
        self.held_bytes += self._sizes[key]
        self.touch([key])

    def touch(self, keys: list[str]) -> None:
        """These held arrays were just asked for: the last to go."""
        now = time.monotonic()
        for key in keys:
            if key in self.paths:
                self._used[key] = now

    def touch_paths(self, paths: set[str]) -> None:
        """The held arrays in these files were just used."""
        if paths:
            self.touch([k for k, p in self.paths.items() if p in paths])

    def evict(self, in_use: set[str], budget: int, grace: float) -> list[str]:
        """Delete the least recently used arrays whose files are not in ``in_use`` (paths an
        open stream or a queued task reads) and that were not asked for in the last
        ``grace`` seconds (one just sent waits for the request that names it), until those
        left unused take at most ``budget`` bytes; returns the paths deleted (processes that
        mapped them should let go: a deleted file's pages stay until its last mapping goes)."""
        if self.held_bytes <= budget:
            return []
        unused = [k for k, p in self.paths.items() if p not in in_use]
        spare = sum(self._sizes[k] for k in unused)
        old = time.monotonic() - grace
        gone = []
        for key in sorted(unused, key=self._used.__getitem__):
            if spare <= budget or self._used[key] > old:
                break
            path = self.paths.pop(key)
            size = self._sizes.pop(key)
            spare -= size
            self.held_bytes -= size
            del self._used[key]
            try:
                os.unlink(path)
            except OSError:
                pass
            gone.append(path)
        return gone

    def prepare_file(self, key: str, path: str) -> str | None:
        """The checks of a same-host client's ``.npy`` file in the (0700) shared folder that
        take no time: its real path, to hash with :meth:`verify_file` (the router does, in
        a thread) before :meth:`adopt`; ``None`` when the key is held already (it stays)."""
        check_key(key)
        if not isinstance(path, str):
            raise RequestError(ErrorCode.INVALID_ARGUMENT, f"path should be a string, got {path!r:.80}")
        if key in self.paths:
            return None
        real = os.path.realpath(path)
        if os.path.dirname(real) != os.path.realpath(self.folder):
            raise RequestError(ErrorCode.INVALID_ARGUMENT, f"{path} is not inside {self.folder}")
        arr = self._open(real, path)
        try:
            proto.check_dtype(arr.dtype)
        except proto.UnsupportedDtype as exc:
            raise RequestError(ErrorCode.UNSUPPORTED_DTYPE, str(exc)) from exc
        finally:
            del arr
        return real

    @staticmethod
    def _open(real: str, path: str) -> np.ndarray[Any, Any]:
        try:
            return np.load(real, mmap_mode="r", allow_pickle=False)  # type: ignore[no-any-return]
        except (OSError, ValueError) as exc:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, f"{path} is not a readable .npy: {exc}") from exc

    def verify_file(self, key: str, real: str) -> None:
        """Hash the file (about 1.5 GB/s: run it off the router's loop) and raise unless its
        content key is ``key``: another client of the same server could otherwise make a
        key it knows name bytes of its own."""
        arr = self._open(real, real)
        try:
            if content_key(arr) != key:
                raise RequestError(ErrorCode.INVALID_ARGUMENT, f"the bytes of {real} do not match key {key}")
        finally:
            del arr

    def adopt(self, key: str, real: str) -> None:
        """Serve a verified file under ``key``."""
        if key not in self.paths:
            self._hold(key, real)

    def _begin(self, owner: bytes, msg: proto.UploadChunk) -> _Partial:
        if not isinstance(msg.shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in msg.shape
        ):
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"upload shape should be a list of integers, got {msg.shape!r:.80}",
            )
        try:
            dtype = proto.dtype_from_wire(msg.dtype)
        except proto.UnsupportedDtype as exc:
            raise RequestError(ErrorCode.UNSUPPORTED_DTYPE, str(exc)) from exc
        except proto.ProtocolError as exc:
            raise RequestError(ErrorCode.MALFORMED, str(exc)) from exc
        if not msg.shape or len(msg.shape) > proto.arrays.MAX_NDIM or any(d < 0 for d in msg.shape):
            raise RequestError(ErrorCode.INVALID_ARGUMENT, f"upload shape {msg.shape} is invalid")
        total = int(np.prod(msg.shape, dtype=np.float64)) * dtype.itemsize
        if total > self.max_bytes:
            raise RequestError(
                ErrorCode.TOO_LARGE, f"upload of {total} bytes exceeds the server's limit of {self.max_bytes}"
            )
        if msg.offset != 0:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, f"upload of {msg.key} must start at offset 0")
        name = f"{msg.key.replace(':', '-')}.{secrets.token_hex(4)}.npy.part"
        path = os.path.join(self.folder, name)
        try:
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(msg.shape))
        except (OSError, ValueError) as exc:
            if os.path.exists(path):
                os.unlink(path)
            raise RequestError(
                ErrorCode.TOO_LARGE, f"cannot store an upload of {total} bytes: {exc}"
            ) from exc
        return _Partial(path, mm, ContentHasher(dtype.str, msg.shape), total)

    def _abort(self, owner: bytes, key: str) -> None:
        part = self._partial.pop((owner, key), None)
        if part is not None:
            del part.mm
            if os.path.exists(part.path):
                os.unlink(part.path)

    def chunk(self, owner: bytes, msg: proto.UploadChunk, data: np.ndarray[Any, Any]) -> None:
        """Add one chunk of ``owner``'s upload; the last one verifies and publishes it."""
        if check_key(msg.key) in self.paths:  # the key names the file: never a path
            self.touch([msg.key])
            return
        part = self._partial.get((owner, msg.key))
        if part is None:
            part = self._begin(owner, msg)
            self._partial[(owner, msg.key)] = part
        raw = data.reshape(-1).view(np.uint8)
        if msg.offset != part.received or part.received + raw.nbytes > part.total:
            received, total = part.received, part.total
            self._abort(owner, msg.key)
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"upload chunk of {msg.key} at offset {msg.offset} with {raw.nbytes} bytes does not "
                f"continue the {received} of {total} bytes received",
            )
        flat = part.mm.reshape(-1).view(np.uint8)
        flat[part.received : part.received + raw.nbytes] = raw
        del flat
        part.hasher.update(raw.data)
        part.received += raw.nbytes
        if part.received < part.total:
            return
        self._partial.pop((owner, msg.key))
        part.mm.flush()
        del part.mm
        if part.hasher.key() != msg.key:
            os.unlink(part.path)
            raise RequestError(ErrorCode.INVALID_ARGUMENT, f"uploaded bytes do not match key {msg.key}")
        final = os.path.join(self.folder, msg.key.replace(":", "-") + ".npy")
        os.replace(part.path, final)
        self._hold(msg.key, final)

    def forget_shares_of(self, pid: int) -> None:
        """A same-host client process went away: remove the temporary files it was writing
        into the shared folder (``<key>.<pid>.tmp.npy``; interrupted, or killed, mid-write)."""
        for path in glob.glob(os.path.join(glob.escape(self.folder), f"*.{pid}.tmp.npy")):
            try:
                os.unlink(path)
            except OSError:
                pass

    def forget_owner(self, owner: bytes) -> None:
        """A client went away: drop its unfinished uploads."""
        for o, key in [k for k in self._partial if k[0] == owner]:
            self._abort(o, key)
