"""fetch_file against a real local HTTP server that misbehaves like real mirrors do."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests

from batchup_server.datasets.download import (
    ChecksumError,
    DiskFullError,
    DownloadError,
    RemoteFile,
    fetch_file,
    sha256_file,
)
from tests.http_server import FileServer

FAST = {"timeout": 5.0, "backoff": 0.01, "progress": False}
NAME = "train-images-idx3-ubyte.gz"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remote_for(data: bytes, *urls: str, name: str = NAME) -> RemoteFile:
    return RemoteFile(name, tuple(urls), digest(data))


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def closed_port_url() -> str:
    """A URL on which nothing listens, for a connection refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{NAME}"


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


@pytest.fixture
def folder(tmp_path: object) -> str:
    return os.path.join(str(tmp_path), "datasets", "mnist")  # not there yet: fetch_file creates it


# --- the normal case and the local copy ---


def test_downloads_into_a_new_folder_and_verifies(server: FileServer, folder: str) -> None:
    data = payload(300_000)
    url = server.add("a/" + NAME, data)
    path = fetch_file(remote_for(data, url), folder, **FAST)
    assert path == os.path.join(folder, NAME)
    assert read(path) == data
    assert sha256_file(path, chunk=4096) == digest(data)
    assert os.listdir(folder) == [NAME]  # no .part left behind
    assert server.requests == [("a/" + NAME, None)]


def test_progress_bar_names_the_file(server: FileServer, folder: str, capsys: pytest.CaptureFixture) -> None:
    data = payload(50_000)
    fetch_file(remote_for(data, server.add(NAME, data)), folder, timeout=5.0, progress=True)
    assert NAME in capsys.readouterr().err


def test_second_call_makes_no_request(server: FileServer, folder: str) -> None:
    data = payload(10_000)
    remote = remote_for(data, server.add(NAME, data))
    first = fetch_file(remote, folder, **FAST)
    seen = list(server.requests)
    assert fetch_file(remote, folder, **FAST) == first
    assert server.requests == seen == [(NAME, None)]


def test_corrupt_final_file_is_replaced(
    server: FileServer, folder: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = payload(20_000)
    os.makedirs(folder)
    write(os.path.join(folder, NAME), b"not the file")
    path = fetch_file(remote_for(data, server.add(NAME, data)), folder, **FAST)
    assert read(path) == data
    assert len(server.requests) == 1
    assert any(r.levelno == logging.WARNING and "deleting it" in r.getMessage() for r in caplog.records)


def test_unknown_digest_is_accepted_and_logged(
    server: FileServer, folder: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = payload(5_000)
    caplog.set_level(logging.INFO, logger="batchup_server.datasets")
    path = fetch_file(RemoteFile(NAME, (server.add(NAME, data),), None), folder, **FAST)
    assert read(path) == data
    assert any(digest(data) in r.getMessage() for r in caplog.records)


# --- resuming ---


def test_resumes_from_an_existing_part(server: FileServer, folder: str) -> None:
    data = payload(200_000)
    os.makedirs(folder)
    write(os.path.join(folder, NAME + ".part"), data[:70_000])
    path = fetch_file(remote_for(data, server.add(NAME, data)), folder, **FAST)
    assert read(path) == data
    assert server.requests == [(NAME, "bytes=70000-")]


def test_truncated_body_is_resumed_on_the_next_try(server: FileServer, folder: str) -> None:
    data = payload(100_000)
    url = server.add(NAME, data, behaviour="truncate_once")
    path = fetch_file(remote_for(data, url), folder, **FAST)
    assert read(path) == data
    assert server.gets(NAME) == [None, "bytes=50000-"]


def test_server_ignoring_range_restarts_a_stale_part(server: FileServer, folder: str) -> None:
    data = payload(60_000)
    os.makedirs(folder)
    write(os.path.join(folder, NAME + ".part"), payload(30_000, seed=9))  # bytes of some other file
    path = fetch_file(remote_for(data, server.add(NAME, data, behaviour="no_range")), folder, **FAST)
    assert read(path) == data
    assert server.requests == [(NAME, "bytes=30000-")]


def test_416_with_a_complete_part_uses_it(server: FileServer, folder: str) -> None:
    data = payload(40_000)
    os.makedirs(folder)
    write(os.path.join(folder, NAME + ".part"), data)  # e.g. killed between download and rename
    path = fetch_file(remote_for(data, server.add(NAME, data)), folder, **FAST)
    assert read(path) == data
    assert server.requests == [(NAME, "bytes=40000-")]


def test_416_with_an_oversized_part_restarts_from_zero(server: FileServer, folder: str) -> None:
    data = payload(40_000)
    os.makedirs(folder)
    write(os.path.join(folder, NAME + ".part"), payload(50_000, seed=3))
    path = fetch_file(remote_for(data, server.add(NAME, data)), folder, **FAST)
    assert read(path) == data
    assert server.requests == [(NAME, "bytes=50000-"), (NAME, None)]


def test_bad_bytes_in_an_old_part_are_not_blamed_on_the_mirror(server: FileServer, folder: str) -> None:
    data = payload(60_000)
    os.makedirs(folder)
    write(os.path.join(folder, NAME + ".part"), payload(20_000, seed=5))  # e.g. from a changed file
    path = fetch_file(remote_for(data, server.add(NAME, data)), folder, **FAST)
    assert read(path) == data
    assert server.requests == [(NAME, "bytes=20000-"), (NAME, None)]  # the resume failed, so from zero


# --- mirrors and retries ---


@pytest.mark.parametrize(("behaviour", "tries"), [("fail500", 3), ("missing", 1)])
def test_bad_first_mirror_falls_through_to_the_second(
    server: FileServer, folder: str, behaviour: str, tries: int
) -> None:
    data = payload(30_000)
    bad = server.add("bad/" + NAME, data, behaviour=behaviour)
    good = server.add("good/" + NAME, data)
    path = fetch_file(remote_for(data, bad, good), folder, attempts=3, **FAST)
    assert read(path) == data
    assert len(server.gets("bad/" + NAME)) == tries  # 5xx is retried, 404 is not
    assert server.gets("good/" + NAME) == [None]


def test_next_mirror_resumes_where_the_last_one_dropped(server: FileServer, folder: str) -> None:
    data = payload(80_000)
    flaky = server.add("flaky/" + NAME, data, behaviour="truncate_always")
    good = server.add("good/" + NAME, data)
    path = fetch_file(remote_for(data, flaky, good), folder, attempts=1, **FAST)
    assert read(path) == data
    assert server.gets("good/" + NAME) == ["bytes=40000-"]


def test_corrupt_first_mirror_is_not_retried(
    server: FileServer, folder: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = payload(30_000)
    bad = server.add("bad/" + NAME, data, behaviour="corrupt")
    good = server.add("good/" + NAME, data)
    path = fetch_file(remote_for(data, bad, good), folder, **FAST)
    assert read(path) == data
    assert server.gets("bad/" + NAME) == [None]
    assert any("SHA-256" in r.getMessage() and bad in r.getMessage() for r in caplog.records)


def test_all_mirrors_failing_lists_every_url(server: FileServer, folder: str) -> None:
    data = payload(1_000)
    urls = [
        server.add("404/" + NAME, data, behaviour="missing"),
        server.add("500/" + NAME, data, behaviour="fail500"),
        server.add("bad/" + NAME, data, behaviour="corrupt"),
        closed_port_url(),
    ]
    with pytest.raises(DownloadError) as info:
        fetch_file(remote_for(data, *urls), folder, attempts=2, **FAST)
    assert not isinstance(info.value, ChecksumError)  # only one of the failures was a checksum
    message = str(info.value)
    lines = message.splitlines()
    assert lines[0] == f"could not download {NAME} from any of:"
    assert [line.split(": ", 1)[0].strip() for line in lines[1:]] == urls
    assert "HTTP 404" in lines[1] and "HTTP 500" in lines[2] and "SHA-256" in lines[3]
    assert "connection failed" in lines[4]
    assert os.listdir(folder) == []


def test_all_mirrors_corrupt_raises_checksum_error(server: FileServer, folder: str) -> None:
    data = payload(1_000)
    urls = [server.add(f"{i}/{NAME}", data, behaviour="corrupt") for i in range(2)]
    with pytest.raises(ChecksumError, match="could not download"):
        fetch_file(remote_for(data, *urls), folder, **FAST)
    assert os.listdir(folder) == []


def test_always_truncated_keeps_the_part_for_later(server: FileServer, folder: str) -> None:
    data = payload(80_000)
    url = server.add(NAME, data, behaviour="truncate_always")
    with pytest.raises(DownloadError, match="truncated|connection dropped") as info:
        fetch_file(remote_for(data, url), folder, attempts=3, **FAST)
    assert not isinstance(info.value, ChecksumError)
    assert server.gets(NAME) == [None, "bytes=40000-", "bytes=60000-"]
    assert not os.path.exists(os.path.join(folder, NAME))
    part = read(os.path.join(folder, NAME + ".part"))
    assert part == data[:70_000]
    server.set_behaviour(NAME, "ok")  # a later run finishes it
    assert read(fetch_file(remote_for(data, url), folder, **FAST)) == data
    assert server.gets(NAME)[-1] == "bytes=70000-"


def test_stalled_server_times_out(server: FileServer, folder: str) -> None:
    data = payload(10_000)
    url = server.add(NAME, data, behaviour="stall")
    began = time.monotonic()
    with pytest.raises(DownloadError, match="timed out after 0.5 s"):
        fetch_file(remote_for(data, url), folder, timeout=0.5, attempts=2, backoff=0.01, progress=False)
    assert time.monotonic() - began < 5
    assert len(server.gets(NAME)) == 2
    assert not os.path.exists(os.path.join(folder, NAME))


# --- interruption and the disk ---


INTERRUPTED_RUN = """
import sys
from batchup_server.datasets.download import RemoteFile, fetch_file
name, url, digest, folder = sys.argv[1:]
fetch_file(RemoteFile(name, (url,), digest), folder, timeout=30, progress=False)
"""


def test_ctrl_c_leaves_no_final_file_and_a_resumable_part(server: FileServer, folder: str) -> None:
    """A real SIGINT to a process blocked mid-body, as when someone presses Ctrl-C."""
    data = payload(3 << 20)
    url = server.add(NAME, data, behaviour="stall_half")
    part = os.path.join(folder, NAME + ".part")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_RUN, NAME, url, digest(data), folder],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        # Bytes on disk mean the child is inside the transfer loop (the part is written 1 MiB-buffered,
        # so how much shows up before the stall depends on how the socket handed the bytes over).
        while not (os.path.exists(part) and os.path.getsize(part)):
            assert time.monotonic() < deadline and child.poll() is None, "the download never got going"
            time.sleep(0.02)  # noqa: sleep-ok (polling the child's file with a deadline)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode != 0 and b"KeyboardInterrupt" in stderr
    assert not os.path.exists(os.path.join(folder, NAME))
    kept = read(part)  # what arrived, flushed on the way out (the last bytes may still have been in flight)
    assert 0 < len(kept) <= len(data) // 2 and kept == data[: len(kept)]
    server.set_behaviour(NAME, "ok")
    assert read(fetch_file(remote_for(data, url), folder, **FAST)) == data
    assert server.requests == [(NAME, None), (NAME, f"bytes={len(kept)}-")]


def test_disk_full_stops_at_once_and_cleans_up(server: FileServer, tmp_path: object) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs to fill up needs root")
    small = os.path.join(str(tmp_path), "small")
    os.makedirs(small)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", small], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        data = payload(1 << 20)
        urls = [server.add("one/" + NAME, data), server.add("two/" + NAME, data)]
        with pytest.raises(DiskFullError) as info:
            fetch_file(remote_for(data, *urls), small, **FAST)
        assert f"into {small} (needs {1 << 20} bytes, " in str(info.value)
        assert os.listdir(small) == []
        assert server.gets("two/" + NAME) == []  # no other mirror was tried
    finally:
        subprocess.run(["umount", small], check=True)


def test_file_names_cannot_escape_the_folder() -> None:
    for bad in ["", "..", "../evil", "a/b"]:
        with pytest.raises(ValueError):
            RemoteFile(bad, ("http://example.invalid/x",), None)


def test_file_server_speaks_ranges_and_head() -> None:
    """The test server itself, since other tests (end-to-end dataset ones) rely on it too."""
    data = payload(1_000)
    with FileServer({"f.bin": data}) as srv:
        assert requests.get(srv.url("f.bin"), timeout=5).content == data
        part = requests.get(srv.url("f.bin"), headers={"Range": "bytes=990-"}, timeout=5)
        assert (part.status_code, part.headers["Content-Range"], part.content) == (
            206,
            "bytes 990-999/1000",
            data[990:],
        )
        beyond = requests.get(srv.url("/f.bin"), headers={"Range": "bytes=1000-"}, timeout=5)
        assert (beyond.status_code, beyond.headers["Content-Range"]) == (416, "bytes */1000")
        head = requests.head(srv.url("f.bin"), timeout=5)
        assert (head.status_code, head.headers["Content-Length"], head.content) == (200, "1000", b"")
        assert requests.get(srv.url("nope"), timeout=5).status_code == 404
        assert srv.requests == [
            ("f.bin", None),
            ("f.bin", "bytes=990-"),
            ("f.bin", "bytes=1000-"),
            ("nope", None),
        ]
        with pytest.raises(ValueError):
            srv.set_behaviour("f.bin", "explode")
