"""Same-host batches through shared-memory slots: correct, stable while held, bounded, cleaned up."""

from __future__ import annotations

import gc
import glob
import os

import numpy as np
import pytest

import batchup_client
from batchup_client import data_source, sampling
from batchup_server.demo import make_demo_arrays
from tests.integration.test_streaming import assert_same, expected_batches
from tests.servers import wait_until

pytestmark = pytest.mark.integration

DEMO_PLAN = {"kind": "standard", "length": 12000, "repeats": -1}


def test_same_host_streams_use_shared_memory_and_match(server):
    X, y = make_demo_arrays()
    with batchup_client.connect(server.endpoint) as client:
        assert client.info()["batch_transport"] == "shared memory"
        got = list(client.source("demo").batch_iterator(batch_size=700, shuffle=np.random.RandomState(6)))
        assert client.info()["streams_shared_memory"] == 1
        assert_same(got, expected_batches([X, y], 700, 6))


def test_a_batch_the_user_keeps_never_changes(server):
    with batchup_client.connect(server.endpoint) as client:
        it = client.source("demo", repeats=3).batch_iterator(batch_size=100, shuffle=np.random.RandomState(1))
        kept = []
        for i, (X, y) in enumerate(it):
            if i % 7 == 0:
                kept.append((X, y, X.copy(), y.copy()))
            X += 1.0  # scripts write into their batches
        assert len(kept) > 20
        for X, y, X0, y0 in kept:
            np.testing.assert_array_equal(X, X0 + 1.0)
            np.testing.assert_array_equal(y, y0)


def test_keeping_every_batch_copies_out_instead_of_blocking(server):
    X, y = make_demo_arrays()
    with batchup_client.connect(server.endpoint) as client:
        batches = list(client.source("demo", repeats=2).batch_iterator(batch_size=50))
        assert client.info()["batches_copied_out"] > 0
    assert len(batches) == 480
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), np.concatenate([y, y]))
    assert len({b[0].ctypes.data for b in batches}) == 480  # no two batches share memory


@pytest.mark.parametrize(
    "prefetch", [(128, 1000), (1, 1 << 30), (3, 1 << 30)], ids=["bytes", "credit-1", "credit-3"]
)
def test_a_window_smaller_than_the_pool_streams_while_the_user_holds_batches(server, prefetch):
    """A byte budget below one batch, or fewer batch credits than the pool's 4 slots: the
    stream still ends while the loop holds its previous batch (and every third one)."""
    X, y = make_demo_arrays()
    with batchup_client.connect(server.endpoint) as client:
        client.prefetch = prefetch
        kept, got = [], []
        for i, batch in enumerate(
            client.source("demo").batch_iterator(batch_size=500, shuffle=np.random.RandomState(4))
        ):
            got.append(batch)  # every batch stays alive: the pool copies out, never blocks
            if i % 3 == 0:
                kept.append(batch)
        assert client.info()["streams_shared_memory"] == 1
    assert_same(got, expected_batches([X, y], 500, 4))


def test_slots_bound_the_batches_in_flight(server):
    with batchup_client.connect(server.endpoint) as client:
        sid = client.open_stream({"name": "demo"}, DEMO_PLAN, [], 64, False, None, 6, 1 << 30)
        pool = client.pool(sid)
        assert pool is not None and pool.slots == 6
        assert client.poll_data(15)
        while client.poll_data(0.5):
            pass
        assert client.buffered(sid) == 6
        client.send_credit(sid, 5, 0)  # credit without free slots: nothing more may come
        assert not client.poll_data(0.5)
        first, arrays = client.next_item(sid, 0)
        del first, arrays
        gc.collect()
        client.send_credit(sid, 0, 1, pool.take_freed())  # the slot is free: one more batch
        assert client.poll_data(10)
        assert client.buffered(sid) == 6
        client.close_stream(sid)


def test_pools_are_reused_by_later_streams_and_removed_with_their_client(server):
    shm_dirs = [d for d in os.listdir("/dev/shm") if d.startswith(f"batchup-{server.pid}-")]
    assert len(shm_dirs) == 1
    folder = os.path.join("/dev/shm", shm_dirs[0])

    def pools():
        return sorted(name for name in os.listdir(folder) if name.startswith("pool-"))

    with batchup_client.connect(server.endpoint) as client:
        for _ in range(3):  # one iterator per epoch: the same pools each time (warm pages)
            assert sum(1 for _ in client.source("demo").batch_iterator(batch_size=64)) == 188
        # two take turns: the next epoch's stream is opened ahead, before this one closes
        assert len(pools()) == 2 and client.info()["streams_taken_over"] == 1
        for _ in range(10):  # iterators left early, batches still in flight: no slot leaks
            it = client.source("demo").batch_iterator(batch_size=64)
            next(it)
            it.close()
        assert sum(1 for _ in client.source("demo").batch_iterator(batch_size=64)) == 188
        assert client.info()["batches_copied_out"] == 0
        assert len(pools()) == 2
        X, _ = next(client.source("demo").batch_iterator(batch_size=64))
    wait_until(lambda: not pools(), what="the pools of a client that said goodbye to go")
    X[:] = 3.0  # a batch stays valid after its pool file is gone
    assert (X == 3.0).all()


@pytest.mark.parametrize("how", ["share_memory=False", "attribute"])
def test_socket_path_when_asked(server, how):
    X, y = make_demo_arrays()
    kwargs = {"share_memory": False} if how == "share_memory=False" else {}
    with batchup_client.connect(server.endpoint, **kwargs) as client:
        if how == "attribute":
            client.shared_memory_batches = False
        assert client.info()["batch_transport"] == "tcp socket"
        got = list(client.source("demo").batch_iterator(batch_size=5000, shuffle=np.random.RandomState(2)))
        assert client.info()["streams_socket"] == 1
    assert_same(got, expected_batches([X, y], 5000, 2))


def test_iterators_closed_early_leak_no_slot(server):
    """Slots freed but not yet reported when an iterator closes go to the pool's next stream."""
    with batchup_client.connect(server.endpoint) as client:
        src = client.source("demo", repeats=-1)
        for _ in range(25):
            it = src.batch_iterator(batch_size=64, shuffle=np.random.RandomState(0))
            for _ in range(5):
                next(it)
            it.close()
        while client.poll_data(0.5):  # late batches of the closed streams free their slots
            pass
        gc.collect()
        batches, nbytes = client.prefetch  # the same geometry as the iterators': the same pool
        sid = client.open_stream({"name": "demo"}, DEMO_PLAN, [], 64, False, None, batches, nbytes)
        pool = client.pool(sid)
        client.send_credit(sid, 0, 0, pool.take_freed())
        assert client.poll_data(15)
        while client.poll_data(0.5):
            pass
        assert client.buffered(sid) == pool.slots  # every slot came back
        client.close_stream(sid)


def test_a_stream_opened_while_the_last_ones_slots_are_in_flight_gets_its_batches():
    """Short-lived iterators in a row share one pool, and the user still holds the last
    one's batches: a new stream may start with every other slot held by the closed one's
    late batches. The reader hands those back while it waits (else the server has no slot
    to fill and both sides wait for ever). Sharded weighted draws hit this most often."""
    x = np.arange(206, dtype=np.float32).reshape(103, 2)
    w = np.linspace(1, 2, 103)
    for trial in range(20):
        kept = []
        for rank in range(3):
            ds = data_source.ArrayDataSource([x], sampler=sampling.WeightedSampler(w))
            it = ds.batch_iterator(5, shuffle=np.random.RandomState(trial), rank=rank, world_size=3)
            kept.append([next(it) for _ in range(4)])  # held while the next iterators start
        assert [len(b[0]) for batches in kept for b in batches] == [5] * 12
    assert batchup_client.default_client().info()["streams_shared_memory"] >= 60


def test_a_failed_batch_gives_its_slot_back(tmp_path):
    from tests.servers import RunningServer

    X = np.arange(400, dtype=np.float32).reshape(200, 2)
    np.save(tmp_path / "bad.npy", X)
    np.save(tmp_path / "good.npy", X)
    (tmp_path / "s.toml").write_text(
        '[sources.bad]\nnpy = { X = "bad.npy" }\n[sources.good]\nnpy = { X = "good.npy" }\n'
    )
    with RunningServer("--config", str(tmp_path / "s.toml"), "--workers", "1") as srv:
        (tmp_path / "bad.npy").write_bytes(b"no longer an npy file")
        with batchup_client.connect(srv.endpoint) as client:
            it = client.source("bad").batch_iterator(batch_size=10)
            with pytest.raises(batchup_client.RemoteException):
                next(it)
            it.close()
            batches, nbytes = client.prefetch  # same geometry: the failed stream's pool
            plan = {"kind": "standard", "length": 200, "repeats": -1}
            sid = client.open_stream({"name": "good"}, plan, [], 10, False, None, batches, nbytes)
            pool = client.pool(sid)
            client.send_credit(sid, 0, 0, pool.take_freed())
            assert client.poll_data(15)
            while client.poll_data(0.5):
                pass
            assert client.buffered(sid) == pool.slots


def test_an_interrupted_array_share_leaves_no_partial_file(server, monkeypatch):
    """Ctrl-C while a client wrote an array into the server's shared folder left the
    partial file there (hundreds of MB of RAM in /dev/shm) until the server stopped: the
    client removes it, and the server removes those of a client process that went away
    (killed mid-write)."""
    import batchup_client.connection as connection

    real_save = np.save

    def interrupted(path, arr, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    with batchup_client.connect(server.endpoint) as client:
        shm_dir = client.welcome.shm_dir
        monkeypatch.setattr(connection.np, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            client.array_source([np.arange(1000.0)])
        monkeypatch.setattr(connection.np, "save", real_save)
        assert not glob.glob(os.path.join(shm_dir, "*.tmp.npy"))
        # a process killed mid-write: its file goes when the server drops its client
        left = os.path.join(shm_dir, f"sha256-{'0' * 64}.{os.getpid()}.tmp.npy")
        with open(left, "wb") as f:
            f.write(b"partial")
        other = os.path.join(shm_dir, f"sha256-{'1' * 64}.{os.getpid() + 1}.tmp.npy")
        with open(other, "wb") as f:
            f.write(b"another process's, still writing")
    wait_until(lambda: not os.path.exists(left), what="the partial file removed")
    assert os.path.exists(other)
    os.unlink(other)
