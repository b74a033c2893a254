"""Failures: a vanished client, a dead server, a crashed worker, an error in a source."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import batchup_client
import batchup_protocol
from batchup_protocol.host import sweep_stale
from batchup_server.demo import make_demo_arrays
from tests.servers import RunningServer, children_of, pid_alive, wait_until, worker_pids, write_train_source

pytestmark = pytest.mark.integration

CLIENT_SCRIPT = """
import sys, batchup_client
client = batchup_client.connect(sys.argv[1])
it = client.source("demo", repeats=-1).batch_iterator(batch_size=64)
next(it)
print("streaming", flush=True)
sys.stdin.read()
"""


def test_vanished_client_is_reclaimed_after_the_timeout():
    with RunningServer("--client-timeout", "1", "--heartbeat-interval", "0.2", "--workers", "1") as srv:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT_SCRIPT, srv.endpoint],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout.readline().strip() == "streaming"
            proc.kill()  # no goodbye, no close: it just disappears
            proc.wait(10)
            line = srv.wait_for_log(r"silent for more than 1s: reclaiming 1 stream", timeout=10)
            assert "client" in line
            # SIGKILL ran no cleanup; the next client to start sweeps the private folder
            batchup_client.connect(srv.endpoint).close()
            assert not glob.glob(f"/tmp/batchup-client-{proc.pid}-*")
        finally:
            proc.kill()
            proc.wait(10)
            proc.stdin.close()
            proc.stdout.close()


def test_busy_client_is_kept_alive_by_heartbeats():
    with RunningServer("--client-timeout", "1", "--heartbeat-interval", "0.2", "--workers", "1") as srv:
        with batchup_client.connect(srv.endpoint) as client:
            it = client.source("demo").batch_iterator(batch_size=1000)
            next(it)
            time.sleep(2.5)  # noqa: sleep-ok (a long training step longer than client_timeout)
            assert sum(1 for _ in it) == 11
        assert not any("reclaiming" in line and "silent" in line for line in srv.lines)


def test_dead_server_gives_a_clear_error_not_a_hang():
    srv = RunningServer("--heartbeat-interval", "0.2", "--workers", "1")
    client = batchup_client.connect(srv.endpoint, server_timeout=1.5)
    try:
        it = client.source("demo", repeats=-1).batch_iterator(batch_size=6000)
        next(it)
        srv.kill()
        start = time.monotonic()
        with pytest.raises(batchup_client.ConnectionLost, match="stopped answering heartbeats"):
            for _ in range(100000):
                next(it)
        assert time.monotonic() - start < 10
        with pytest.raises(batchup_client.ConnectionLost):
            client.source("demo")
    finally:
        client.close()
    with pytest.raises(batchup_client.ClientClosed):
        client.source("demo")


def test_an_iterator_of_a_closed_client_hands_out_nothing_more(server):
    """Batches that had come in were still handed out after close() (one, sometimes)."""
    for shm in (True, False):
        with batchup_client.connect(server.endpoint) as client:
            client.shared_memory_batches = shm
            it = client.source("demo", repeats=-1).batch_iterator(batch_size=64)
            next(it)
            (inbox,) = client._inboxes.values()
            # batches come in while the reader waits (filed here by hand); then the close
            wait_until(lambda: client._recv_data(0) and len(inbox) > 2, what="batches waiting")  # noqa: B023
        with pytest.raises(batchup_client.ClientClosed):
            next(it)


def test_connect_to_nothing_fails_clearly(tmp_path):
    refused = r"nothing accepted a connection at {} \(\d+ attempts within 0.5s were refused or failed\)"
    with pytest.raises(batchup_client.ConnectionLost, match=refused.format("tcp://127.0.0.1:9")):
        batchup_client.connect("tcp://127.0.0.1:9", timeout=0.5)
    missing = f"ipc://{tmp_path}/no-server"
    with pytest.raises(batchup_client.ConnectionLost, match=refused.format(re.escape(missing))):
        batchup_client.connect(missing, timeout=0.5)
    with socket.socket() as silent:  # accepts connections and never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(
            batchup_client.ConnectionLost, match="was accepted, but no batchup-server answered"
        ):
            batchup_client.connect(address, timeout=0.5)
    with pytest.raises(ValueError, match="tcp:// or ipc://"):
        batchup_client.connect("http://example:1", timeout=0.5)


def test_crashed_worker_batches_are_recomputed_exactly_once():
    X, y = make_demo_arrays()
    with RunningServer("--workers", "2") as srv:
        wait_until(lambda: len(worker_pids(srv.pid)) == 2, what="two workers")
        with batchup_client.connect(srv.endpoint) as client:
            src = client.source("demo", repeats=4)
            it = src.batch_iterator(batch_size=50, shuffle=np.random.RandomState(8))
            got = [next(it) for _ in range(5)]
            victim = worker_pids(srv.pid)[0]
            os.kill(victim, signal.SIGKILL)
            got += list(it)
            srv.wait_for_log("worker [01] died")
            wait_until(
                lambda: len(worker_pids(srv.pid)) == 2 and victim not in worker_pids(srv.pid), what="restart"
            )
    ref = batchup_client.data_source.RandomAccessDataSource(len(X), repeats=4)
    want = list(ref.batch_indices_iterator(50, shuffle=np.random.RandomState(8)))
    assert len(got) == len(want)
    for (bx, by), idx in zip(got, want):
        np.testing.assert_array_equal(bx, X[idx])
        np.testing.assert_array_equal(by, y[idx])


SLOW_PLUGIN = """
import time
from batchup_server.plugins import transform

@transform("slow")
def slow(idx, X, y):  # a worker is always mid-batch when it is killed
    time.sleep(0.02)  # noqa: sleep-ok (a slow transform's work)
    return idx, X * 1, y
"""


def test_a_dead_workers_slot_batches_are_made_again_as_frames_and_kept_batches_stay(tmp_path):
    """Protocol 1.4: a batch a dead worker was to put in a slot is made again as frames
    (naming that slot), never into the slot, which the user may hold or may have freed for
    another batch since. Batches the user keeps and edits in place stay as edited, each
    batch comes once, in order, and the superseded slots come back (later epochs run)."""
    X = np.arange(400 * 6, dtype=np.float32).reshape(400, 6)
    Y = np.arange(400, dtype=np.int64) % 7
    (tmp_path / "bu_slow_plugin.py").write_text(SLOW_PLUGIN)
    cfg = write_train_source(tmp_path, X, Y, '[server]\nplugins = ["bu_slow_plugin"]\n')
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p),
    )
    with RunningServer("--config", cfg, "--workers", "2", env=env) as srv:
        wait_until(lambda: len(worker_pids(srv.pid)) == 2, what="two workers")
        with batchup_client.connect(srv.endpoint) as client:
            src = client.source("train", include_indices=True).map("slow")
            kept = []
            for i, (idx, bx, by) in enumerate(
                src.batch_iterator(batch_size=10, shuffle=np.random.RandomState(3))
            ):
                if i == 2:  # both: under load one may not have had a task yet (still starting)
                    for pid in worker_pids(srv.pid):
                        os.kill(pid, signal.SIGKILL)
                bx *= -1  # the user normalises its batch in place
                kept.append((idx, bx, by))
            info = client.info()
            assert info["batch_transport"] == "shared memory"
            assert info["batches_made_again"] >= 1  # the killed worker had tasks in hand
            for _ in range(3):  # the pool's slots all came back: later epochs stream as before
                assert len(list(src.batch_iterator(batch_size=10, shuffle=np.random.RandomState(4)))) == 40
    want = list(
        batchup_client.data_source.RandomAccessDataSource(400).batch_indices_iterator(
            10, shuffle=np.random.RandomState(3)
        )
    )
    assert len(kept) == len(want) == 40
    for (idx, bx, by), w in zip(kept, want):
        np.testing.assert_array_equal(idx, w)
        np.testing.assert_array_equal(bx, -X[w])  # the user's edit was not written over
        np.testing.assert_array_equal(by, Y[w])


def test_error_in_a_source_reaches_next_and_the_server_keeps_serving(tmp_path):
    X = np.arange(200, dtype=np.float32).reshape(100, 2)
    np.save(tmp_path / "X.npy", X)
    (tmp_path / "s.toml").write_text('[sources.fragile]\nnpy = { X = "X.npy" }\n')
    with RunningServer("--config", str(tmp_path / "s.toml"), "--workers", "1") as srv:
        (tmp_path / "X.npy").write_bytes(b"this is no longer an npy file")
        with batchup_client.connect(srv.endpoint) as client:
            it = client.source("fragile").batch_iterator(batch_size=10)
            with pytest.raises(batchup_client.RemoteException) as info:
                next(it)
            assert info.value.remote_type and "Traceback" in info.value.remote_traceback
            assert "fragile" in str(info.value) or "X.npy" in str(info.value)
            assert len(list(client.source("demo").batch_iterator(batch_size=6000))) == 2


def test_sigterm_and_sigint_shut_down_cleanly(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGINT):
        srv = RunningServer("--workers", "2")
        pid = srv.pid
        wait_until(lambda: len(worker_pids(pid)) == 2, what="two workers")  # noqa: B023
        workers = worker_pids(srv.pid)
        with batchup_client.connect(srv.endpoint) as client:
            it = client.source("demo", repeats=-1).batch_iterator(batch_size=64)
            next(it)
            assert srv.stop(sig) == 0
        assert not any(pid_alive(w) for w in workers), "workers were not reaped"
        assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"batchup-{srv.pid}-")]
        assert any("stopped; removed" in line for line in srv.lines)
        # the port is free again
        port = srv.endpoint.rsplit(":", 1)[1]
        with RunningServer("--bind", f"tcp://127.0.0.1:{port}", "--workers", "1"):
            pass


def test_embedded_server_dies_with_its_parent():
    script = "import batchup_client, sys\nc = batchup_client.connect()\nprint(c.address, flush=True)\nsys.stdin.read()\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("ipc://")
        servers = children_of(proc.pid)
        assert len(servers) == 1
        proc.kill()
        proc.wait(10)
        wait_until(lambda: not pid_alive(servers[0]), what="the embedded server to exit")
        # the killed client could not clean its private folders; the next one to start does
        removed = sweep_stale(tempfile.gettempdir())
        assert any(f"batchup-local-{proc.pid}-" in p for p in removed)
        assert any(f"batchup-client-{proc.pid}-" in p for p in removed)
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()


def test_killed_server_leaves_nothing_for_the_next_one():
    srv = RunningServer("--workers", "1")
    srv.kill(sweep=False)  # SIGKILL: no cleanup ran
    leftover = [p for p in os.listdir("/dev/shm") if p.startswith(f"batchup-{srv.pid}-")]
    assert leftover
    with RunningServer("--workers", "1"):
        assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"batchup-{srv.pid}-")]
    assert not glob.glob(f"/tmp/batchup-{srv.pid}-*")


def test_stopping_server_ends_open_streams_with_shutting_down():
    srv = RunningServer("--workers", "1")
    with batchup_client.connect(srv.endpoint, server_timeout=60) as client:
        it = client.source("demo", repeats=-1).batch_iterator(batch_size=64)
        next(it)
        assert srv.stop() == 0
        start = time.monotonic()
        # ConnectionLost, as a server that stops answering: code that reconnects on it works
        with pytest.raises(
            batchup_client.ConnectionLost, match=f"the server at {srv.endpoint} is shutting down"
        ):
            for _ in range(100000):
                next(it)
        assert time.monotonic() - start < 10  # not the 60 s heartbeat timeout
        start = time.monotonic()
        with pytest.raises(batchup_client.ConnectionLost, match="shutting down"):
            client.source("demo")  # told already: at once, not after a heartbeat timeout
        assert time.monotonic() - start < 1


def test_batches_received_before_a_server_stops_are_read_first():
    """A stopped server's batches that reached the client are handed out before the loss is
    raised (the credit the reader returns meanwhile goes nowhere, and is no error)."""
    srv = RunningServer("--workers", "1")
    with batchup_client.connect(srv.endpoint, server_timeout=60) as client:
        it = client.source("demo", repeats=-1).batch_iterator(batch_size=64)
        next(it)
        (sid,) = client._inboxes

        def buffered() -> int:
            while client.poll_data(0):  # file what came, as a reader would
                pass
            return client.buffered(sid)

        wait_until(lambda: buffered() >= 100, what="100 batches to arrive")
        assert srv.stop() == 0
        with contextlib.suppress(batchup_client.ConnectionLost):
            buffered()  # files what came, and the server's notice that it is shutting down
        held = client.buffered(sid)
        assert client._stopping
        got = 0
        with pytest.raises(batchup_client.ConnectionLost, match="shutting down"):
            for _ in range(100000):
                next(it)
                got += 1
        assert got >= held  # not cut at the next credit (32 batches) as before


def test_refused_credit_fails_the_stream_instead_of_hanging(server):
    with batchup_client.connect(server.endpoint) as client:
        sid = client.open_stream(
            {"name": "demo"},
            {"kind": "standard", "length": 12000, "repeats": -1},
            [],
            64,
            False,
            None,
            2,
            1 << 30,
        )
        client.next_item(sid, 0)
        client.send_credit(sid, 1, 999)  # claims more consumed than ever sent
        with pytest.raises(batchup_client.InvalidArgumentError, match="consumed"):
            for seq in range(1, 100):
                msg, _ = client.next_item(sid, seq)
                if isinstance(msg, batchup_protocol.Error):
                    raise batchup_client.errors.remote_error(msg.code, msg.message)


def test_remote_samples_by_indices_errors_match_numpy(server):
    with batchup_client.connect(server.endpoint) as client:
        src = client.source("demo")
        with pytest.raises(IndexError, match="out of bounds"):
            src.samples_by_indices(np.array([12000]))
        with pytest.raises(IndexError):
            src.samples_by_indices(np.array([1.5]))
        with pytest.raises(IndexError):
            client.array_source([])


EXIT_MID_HANDSHAKE = """
import glob, os, sys, threading, time
import batchup_client

def connect():
    try:
        batchup_client.connect(sys.argv[1], timeout=30)
    except Exception:
        pass

# as a fanned-out client's reconnector does: a daemon thread connecting to a server that
# does not answer when the program ends
threading.Thread(target=connect, daemon=True).start()
deadline = time.monotonic() + 20
while not glob.glob(os.path.join(sys.argv[2], f"batchup-client-{os.getpid()}-*")):
    assert time.monotonic() < deadline, "the client made no private folder"
    time.sleep(0.01)  # noqa: sleep-ok (polling for the folder)
print("exiting mid-handshake", flush=True)
"""


def test_a_client_still_connecting_when_the_program_ends_leaves_no_folder(tmp_path):
    """A client made in a daemon thread (a fanned-out client reconnecting to a server that
    stopped answering) is cut off mid-handshake at exit; its private folder goes anyway."""
    silent = socket.socket()  # accepts TCP connections (backlog) and never speaks ZMTP
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHUP_")}
        env["TMPDIR"] = str(tmp)
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        done = subprocess.run(
            [sys.executable, "-c", EXIT_MID_HANDSHAKE, address, str(tmp)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "exiting mid-handshake" in done.stdout
        assert not list(tmp.glob("batchup-client-*")), list(tmp.iterdir())
    finally:
        silent.close()


def test_a_client_left_open_says_goodbye_when_its_program_ends():
    """A script that never closed its client left its streams and pools on the server until
    client_timeout; at exit the client says goodbye."""
    with RunningServer("--workers", "1", "--log-level", "info") as srv:
        script = (
            "import batchup_client\n"
            f"c = batchup_client.connect({srv.endpoint!r})\n"
            "next(c.source('demo', repeats=-1).batch_iterator(batch_size=64))\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        srv.wait_for_log(r"client \w+ said goodbye", timeout=5)  # not silent until client_timeout
