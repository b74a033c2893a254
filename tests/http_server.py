"""A local HTTP file server for tests, with misbehaviours (errors, truncation, stalls, corruption).

Tests of downloads need a real server that fails in the ways real mirrors do, without the network:

    with FileServer({"a.bin": data}) as server:
        url = server.url("a.bin")
        server.add("b.bin", other, behaviour="truncate_once")
        ...
        assert server.requests == [("a.bin", None), ("b.bin", None), ("b.bin", "bytes=123-")]

Paths are given without a leading "/" (one is stripped if present) and are logged the same way.
"""

from __future__ import annotations

import http.server
import re
import threading
from types import TracebackType

BEHAVIOURS = frozenset(
    {
        "ok",
        "fail500",
        "missing",
        "truncate_once",
        "truncate_always",
        "no_range",
        "stall",
        "stall_half",
        "corrupt",
    }
)
STALL_SECONDS = 60.0  # longer than any client timeout a test would use; cut short by shutdown
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class FileServer:
    """Serves in-memory files over HTTP on 127.0.0.1 (a free port) from a daemon thread.

    Behaviours per path:
      ok               200, or 206 for ``Range: bytes=N-[M]``, 416 when N >= size; HEAD too
      fail500          500 for every request
      missing          404
      truncate_once    first GET promises the full Content-Length, sends half and closes; then "ok"
      truncate_always  every GET does that
      no_range         ignores Range: always 200 with the whole file
      stall            sends the headers, then nothing for STALL_SECONDS (or until shutdown)
      stall_half       sends the headers and half the body, then stalls like "stall"
      corrupt          "ok", but with one byte of the file flipped
    Unknown paths get 404.
    """

    def __init__(self, files: dict[str, bytes] | None = None):
        self.requests: list[tuple[str, str | None]] = []
        self._files: dict[str, tuple[bytes, str]] = {}
        self._gets: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        for path, data in (files or {}).items():
            self.add(path, data)

    def __enter__(self) -> FileServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving (stalled responses give up promptly) and join the thread."""
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def add(self, path: str, data: bytes, behaviour: str = "ok") -> str:
        """Serve ``data`` at ``path``; returns its full URL."""
        _check_behaviour(behaviour)
        with self._lock:
            self._files[_key(path)] = (bytes(data), behaviour)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{_key(path)}"

    def set_behaviour(self, path: str, behaviour: str) -> None:
        _check_behaviour(behaviour)
        with self._lock:
            data, _ = self._files[_key(path)]
            self._files[_key(path)] = (data, behaviour)

    def gets(self, path: str) -> list[str | None]:
        """The Range headers (None for none) of the GETs of one path, in order."""
        with self._lock:
            return [rng for p, rng in self.requests if p == _key(path)]

    # --- used by the handler threads ---

    def _lookup(self, path: str, is_get: bool, range_header: str | None) -> tuple[bytes, str, int] | None:
        """Record a GET; return (data, behaviour, how many GETs of it came before) or None if unknown."""
        key = _key(path.split("?", 1)[0])
        with self._lock:
            if is_get:
                self.requests.append((key, range_header))
            if key not in self._files:
                return None
            data, behaviour = self._files[key]
            earlier = self._gets.get(key, 0)
            if is_get:
                self._gets[key] = earlier + 1
            return data, behaviour, earlier


def _key(path: str) -> str:
    return path.lstrip("/")


def _check_behaviour(behaviour: str) -> None:
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}; known: {sorted(BEHAVIOURS)}")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, owner: FileServer):
        self.owner = owner
        super().__init__(address, handler)

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients hanging up mid-response is what these tests do on purpose: stay quiet."""


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: truncation is simply a close

    def log_message(self, format: str, *args: object) -> None:
        """No per-request lines on stderr."""

    def do_HEAD(self) -> None:
        self._respond(is_get=False)

    def do_GET(self) -> None:
        self._respond(is_get=True)

    def _respond(self, is_get: bool) -> None:
        range_header = self.headers.get("Range")
        found = self.server.owner._lookup(self.path, is_get, range_header)
        if found is None:
            self._status_only(404)
            return
        data, behaviour, earlier = found
        if behaviour == "missing":
            self._status_only(404)
        elif behaviour == "fail500":
            self._status_only(500)
        elif behaviour == "stall":
            self._stall(len(data))
        else:
            if behaviour == "corrupt" and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            truncate = behaviour == "truncate_always" or (behaviour == "truncate_once" and earlier == 0)
            honour_range = behaviour != "no_range"
            self._send_file(data, range_header if honour_range else None, is_get, truncate, behaviour)

    def _status_only(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_file(
        self, data: bytes, range_header: str | None, is_get: bool, truncate: bool, behaviour: str
    ) -> None:
        """The (ranged) file; with ``truncate`` or "stall_half" only its first half is sent."""
        start, end = 0, len(data)
        match = _RANGE.match(range_header or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if match.group(2):
                end = min(end, int(match.group(2)) + 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if not is_get:
            return
        body = data[start:end]
        if truncate or behaviour == "stall_half":
            body = body[: len(body) // 2]
        self.wfile.write(body)
        if behaviour == "stall_half":
            self.wfile.flush()
            self._wait()

    def _stall(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.flush()
        self._wait()

    def _wait(self) -> None:
        """Hold the connection open without sending anything, but let shutdown end it at once."""
        self.server.owner._stop.wait(STALL_SECONDS)
