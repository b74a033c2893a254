"""Robust downloads of the standard datasets' files: mirrors, retries, resume and SHA-256 checks.

Dataset files are large and their servers are slow, flaky or gone. A job killed half-way through a
download should carry on where it stopped on the next run, and a file under its final name must
always be a complete, verified copy, because the converters that read it trust it blindly. So bytes
go to ``NAME.part`` and only a verified part is renamed (atomically) to ``NAME``.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator

import requests
import urllib3
from tqdm import tqdm

__all__ = ["ChecksumError", "DiskFullError", "DownloadError", "RemoteFile", "fetch_file", "sha256_file"]

log = logging.getLogger("batchup_server.datasets")

CHUNK = 1 << 20
PART_SUFFIX = ".part"
# 4xx answers that are about the server's state rather than our request, so worth retrying.
_RETRYABLE_4XX = frozenset({408, 429})
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: where to put it, where to get it, and how to know it is intact."""

    filename: str  # name of the file once downloaded, e.g. "train-images-idx3-ubyte.gz"
    urls: tuple[str, ...]  # mirrors, tried in order
    sha256: str | None  # expected hex digest; None = accept anything, log the digest

    def __post_init__(self) -> None:
        # The name is joined to a folder we write into: a path here could escape that folder.
        name = self.filename
        if not name or name in {".", ".."} or os.path.basename(name) != name:
            raise ValueError(f"RemoteFile.filename must be a plain file name, got {name!r}")


class DownloadError(Exception):
    """No verified copy of a file could be obtained from any of its URLs."""


class ChecksumError(DownloadError):
    """The bytes received do not have the expected SHA-256 (a corrupt or changed file)."""


class DiskFullError(DownloadError):
    """The disk filled up while writing (ENOSPC): other mirrors would not help, so we stop at once."""


class _TryAgain(Exception):
    """A transient failure (network, timeout, 5xx, truncated body): the same URL may work next time."""


class _NextMirror(Exception):
    """A permanent failure for this URL (404, 403, bad URL): asking it again gives the same answer."""


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so that memory stays bounded for any file size."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch_file(
    remote: RemoteFile,
    folder: str,
    *,
    timeout: float = 30.0,
    attempts: int = 3,
    backoff: float = 0.5,
    progress: bool = True,
    session: requests.Session | None = None,
) -> str:
    """Return the path folder/remote.filename of a verified copy, downloading it if needed.

    Mirrors are tried in order, each up to ``attempts`` times on transient failures (with
    ``backoff * 2**k`` seconds between tries), resuming from the ``.part`` file left by an earlier
    try or run. Raises DownloadError (ChecksumError if every mirror served bad bytes) listing every
    URL with its last error, or DiskFullError as soon as the disk fills up.
    """
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, remote.filename)
    if _existing_copy_ok(final, remote.sha256):
        return final
    if not remote.urls:
        raise DownloadError(
            f"no verified copy of {remote.filename} in {folder} and no URL to download it from"
        )
    own_session = session is None
    http = requests.Session() if session is None else session
    try:
        return _Fetcher(remote, folder, http, timeout, max(1, attempts), backoff, progress).run()
    finally:
        if own_session:
            http.close()


def _existing_copy_ok(final: str, sha256: str | None) -> bool:
    """True if a file already under the final name can be used; a bad one is deleted (not trusted)."""
    if not os.path.exists(final):
        return False
    if sha256 is None:
        log.debug("using existing %s (no expected SHA-256 to check it against)", final)
        return True
    digest = sha256_file(final)
    if digest == sha256.lower():
        log.debug("using existing %s (SHA-256 verified)", final)
        return True
    log.warning(
        "%s exists but its SHA-256 is %s, expected %s; deleting it and downloading again",
        final,
        digest,
        sha256,
    )
    os.remove(final)
    return False


@dataclasses.dataclass
class _Fetcher:
    """The state of one fetch_file call, so that each step can be a small method."""

    remote: RemoteFile
    folder: str
    session: requests.Session
    timeout: float
    attempts: int
    backoff: float
    progress: bool
    inherited: bool = False  # whether the part holds bytes that did not come from the current URL

    @property
    def name(self) -> str:
        return self.remote.filename

    @property
    def final(self) -> str:
        return os.path.join(self.folder, self.name)

    @property
    def part(self) -> str:
        return self.final + PART_SUFFIX

    def run(self) -> str:
        """Try each mirror in turn; return the final path or raise with every mirror's reason."""
        failures: list[tuple[str, DownloadError]] = []
        for url in self.remote.urls:
            error = self._try_url(url)
            if error is None:
                return self.final
            failures.append((url, error))
        raise _all_failed(self.name, failures)

    def _try_url(self, url: str) -> DownloadError | None:
        """Up to ``attempts`` tries of one URL; None on success, else the reason to report."""
        last = DownloadError("not tried")
        # A part left by an earlier run or mirror may hold bad bytes that this URL is not to blame for.
        self.inherited = _size(self.part) > 0
        for k in range(self.attempts):
            if k:
                time.sleep(self.backoff * 2 ** (k - 1))
            try:
                self._download(url)
            except _TryAgain as exc:
                last = DownloadError(str(exc))
                log.warning("try %d/%d of %s from %s failed: %s", k + 1, self.attempts, self.name, url, exc)
                continue
            except _NextMirror as exc:
                log.warning("%s from %s failed: %s (not retrying this URL)", self.name, url, exc)
                return DownloadError(str(exc))
            error = self._verify_and_install(url)
            if not (isinstance(error, ChecksumError) and self.inherited and k + 1 < self.attempts):
                return error
            last, self.inherited = error, False
            log.warning(
                "%s began from an earlier partial download; trying %s again from zero", self.name, url
            )
        return last

    def _verify_and_install(self, url: str) -> DownloadError | None:
        """Check the complete part and rename it into place; bad bytes are deleted, not retried."""
        digest = sha256_file(self.part)
        expected = self.remote.sha256
        if expected is not None and digest != expected.lower():
            os.remove(self.part)
            log.warning(
                "%s from %s has SHA-256 %s, expected %s; deleted it", self.name, url, digest, expected
            )
            return ChecksumError(f"SHA-256 mismatch: got {digest}, expected {expected}")
        if expected is None:
            log.info("%s has SHA-256 %s (no expected digest given, accepted as is)", self.name, digest)
        os.replace(self.part, self.final)
        log.debug("saved %s", self.final)
        return None

    def _download(self, url: str) -> None:
        """One try: bring the part up to a complete body, resuming it if it exists."""
        offset = _size(self.part)
        with self._get(url, offset) as response:
            if response.status_code != 416 or not offset:
                self._receive(response, self._start_offset(url, response, offset))
                return
            if self._part_is_complete(response, offset):
                log.info("%s was already complete in %s", self.name, self.part)
                return
        # 416 for a part that is not the whole file (stale or from a changed file): start afresh.
        # This cannot loop, since without a part there is no Range header and so no 416 to resume.
        log.info("%s: the partial download %s does not verify; restarting from zero", url, self.part)
        os.remove(self.part)
        self._download(url)

    def _get(self, url: str, offset: int) -> requests.Response:
        """Send the GET (with Range when resuming); network failures become _TryAgain."""
        # identity: Range offsets, Content-Length and the checksum are all about the raw file bytes.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        log.info(
            "downloading %s from %s%s", self.name, url, f" (resuming at byte {offset})" if offset else ""
        )
        try:
            return self.session.get(url, headers=headers, stream=True, timeout=(self.timeout, self.timeout))
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _TryAgain(_describe(exc, self.timeout)) from exc
        except requests.RequestException as exc:  # bad URL, too many redirects, ...
            raise _NextMirror(str(exc)) from exc

    def _start_offset(self, url: str, response: requests.Response, offset: int) -> int:
        """Where the response body starts in the file: ``offset`` to append, 0 to restart."""
        status = response.status_code
        if status == 206:
            content_range = response.headers.get("Content-Range", "")
            if content_range.startswith(f"bytes {offset}-"):
                return offset
            _discard(self.part)
            raise _TryAgain(f"asked for bytes={offset}- but got Content-Range {content_range!r}")
        if status == 200:
            if offset:
                log.info("%s ignored the Range request; restarting %s from zero", url, self.name)
            return 0
        reason = f"HTTP {status} {response.reason}".rstrip()
        if status >= 500 or status in _RETRYABLE_4XX:
            raise _TryAgain(reason)
        raise _NextMirror(reason)

    def _part_is_complete(self, response: requests.Response, offset: int) -> bool:
        """After a 416, whether the part already holds the whole file (an interrupted rename)."""
        size = _total_from_content_range(response.headers.get("Content-Range", ""))
        if size is not None and size != offset:
            return False
        if self.remote.sha256 is None:
            return size == offset
        return sha256_file(self.part) == self.remote.sha256.lower()

    def _receive(self, response: requests.Response, start: int) -> None:
        """Append the body to the part (1 MiB-buffered); raise _TryAgain if it stops short.

        Whatever arrived before a failure or a KeyboardInterrupt stays in the part for a resume.
        """
        length = _content_length(response)
        total = None if length is None else start + length
        written = 0
        began = time.monotonic()
        if not start:
            self.inherited = False
        try:
            with (
                open(self.part, "ab" if start else "wb", buffering=CHUNK) as out,
                tqdm(
                    total=total,
                    initial=start,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=self.name,
                    disable=not self.progress,
                ) as bar,
            ):
                for chunk in _body_chunks(response):
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())  # so a crash after the rename cannot leave a short final file
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            got = f"got {start + written} of {total if total is not None else '?'} bytes"
            if _is_timeout(exc):
                raise _TryAgain(f"timed out after {self.timeout:g} s ({got})") from exc
            raise _TryAgain(f"connection dropped ({got})") from exc
        except OSError as exc:
            if exc.errno in _DISK_FULL_ERRNOS:
                raise self._disk_full(total) from exc
            raise
        if length is not None and written < length:
            raise _TryAgain(f"truncated body: got {start + written} of {total} bytes")
        seconds = time.monotonic() - began
        log.info("received %s: %d bytes (%d new) in %.1f s", self.name, start + written, written, seconds)

    def _disk_full(self, total: int | None) -> DiskFullError:
        """Delete the part (it only takes space that is needed) and describe the shortfall."""
        _discard(self.part)
        free = shutil.disk_usage(self.folder).free
        needs = f"needs {total} bytes" if total is not None else "size unknown"
        message = f"disk full while downloading {self.name} into {self.folder} ({needs}, {free} bytes free)"
        log.error("%s", message)
        return DiskFullError(message)


def _all_failed(name: str, failures: list[tuple[str, DownloadError]]) -> DownloadError:
    """One error naming every URL and its last failure; ChecksumError if all served bad bytes."""
    lines = "".join(f"\n  {url}: {error}" for url, error in failures)
    message = f"could not download {name} from any of:{lines}"
    if all(isinstance(error, ChecksumError) for _, error in failures):
        return ChecksumError(message)
    return DownloadError(message)


def _body_chunks(response: requests.Response) -> Iterator[bytes]:
    """The raw body bytes as they arrive (at most 1 MiB at a time), exactly as the server sent them.

    Not ``iter_content``: urllib3 2's ``read(n)`` gathers n bytes before returning and throws away
    what it gathered when the connection drops, so a resume would lose up to a chunk per drop.
    ``read1`` hands over whatever arrived; the 1 MiB-buffered part file still writes in big blocks.
    Not decoded either: Range offsets, Content-Length and the checksum all count the raw bytes.
    """
    raw = response.raw
    if not hasattr(raw, "read1"):  # urllib3 1.x: its read(n) returns what it got before a drop
        yield from raw.stream(CHUNK, decode_content=False)
        return
    while chunk := raw.read1(CHUNK, decode_content=False):
        yield chunk


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _discard(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


def _total_from_content_range(value: str) -> int | None:
    """The file size from ``bytes */SIZE`` or ``bytes A-B/SIZE``; None if absent or ``*``."""
    total = value.rpartition("/")[2].strip()
    return int(total) if value.startswith("bytes ") and total.isdigit() else None


def _is_timeout(exc: BaseException) -> bool:
    """requests reports a read timeout inside the body as a ConnectionError wrapping urllib3's error."""
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError):
        return True
    return any(isinstance(arg, urllib3.exceptions.TimeoutError) for arg in exc.args)


def _describe(exc: requests.RequestException, timeout: float) -> str:
    """A short reason for a failed request, for the log and the final error's list of URLs."""
    if _is_timeout(exc):
        return f"timed out after {timeout:g} s"
    cause = exc.args[0] if exc.args else exc
    reason = getattr(cause, "reason", cause)
    return f"connection failed: {str(reason).rpartition(': ')[2] or reason}"
