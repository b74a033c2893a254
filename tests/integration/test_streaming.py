"""End to end through real server processes: sources, streams, clients, uploads."""

from __future__ import annotations

import os
import threading

import h5py
import numpy as np
import pytest

import batchup_client
import batchup_protocol as proto
from batchup_client import data_source
from batchup_server.demo import make_demo_arrays
from tests.servers import RunningServer

pytestmark = pytest.mark.integration


def expected_batches(arrays, batch_size, seed):
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(arrays[0]))
    return [tuple(a[order[i : i + batch_size]] for a in arrays) for i in range(0, len(order), batch_size)]


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert isinstance(g, tuple) and len(g) == len(w)
        for a, b in zip(g, w):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def test_demo_source_streams_shuffled_batches_over_tcp(server):
    X, y = make_demo_arrays()
    with batchup_client.connect(server.endpoint) as client:
        src = client.source("demo")
        assert src.num_samples() == len(X)
        assert src.metadata["class_names"][0] == "class_0"
        got = list(src.batch_iterator(batch_size=500, shuffle=np.random.RandomState(3)))
    assert_same(got, expected_batches([X, y], 500, 3))


def test_batches_are_writable_and_owned_by_the_caller(server):
    with batchup_client.connect(server.endpoint) as client:
        it = client.source("demo").batch_iterator(batch_size=64)
        X, y = next(it)
        X2, _ = next(it)
        X[:] = 0.0  # scripts normalise in place
        y += 1
        assert X.flags.writeable and not np.shares_memory(X, X2)
        it.close()


def _write_sources(folder):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 3, 4, 4)).astype(np.float32)
    y = rng.randint(0, 10, size=300).astype(np.int64)
    np.save(os.path.join(folder, "X.npy"), X)
    np.save(os.path.join(folder, "y.npy"), y)
    np.savez(os.path.join(folder, "pack.npz"), X=X, y=y, extra=np.arange(300, dtype=np.uint8))
    with h5py.File(os.path.join(folder, "data.h5"), "w") as f:
        f["train/X"] = X
        f["train/y"] = y
    with open(os.path.join(folder, "server.toml"), "w") as f:
        f.write(
            "[server]\nworkers = 2\n\n"
            '[sources.npy]\nnpy = { X = "X.npy", y = "y.npy" }\n\n'
            '[sources.npz]\nnpz = "pack.npz"\nkeys = ["X", "y"]\n\n'
            '[sources.h5]\nhdf5 = "data.h5"\ndatasets = { X = "train/X", y = "train/y" }\n'
        )
    return X, y


@pytest.mark.parametrize("name", ["npy", "npz", "h5"])
def test_config_sources_npy_npz_hdf5(tmp_path, name):
    X, y = _write_sources(str(tmp_path))
    with RunningServer("--config", str(tmp_path / "server.toml"), "--no-demo") as srv:
        with batchup_client.connect(srv.endpoint) as client:
            assert sorted(client.sources) == ["h5", "npy", "npz"]
            src = client.source(name)
            got = list(src.batch_iterator(batch_size=64, shuffle=np.random.RandomState(9)))
            assert_same(got, expected_batches([X, y], 64, 9))
            only_y = client.source(name, fields=["y"], indices=np.arange(10, 20))
            (ys,) = next(only_y.batch_iterator(batch_size=100))
            np.testing.assert_array_equal(ys, y[10:20])
            ndx, Xs, ys = client.source(name, include_indices=True).samples_by_indices(np.array([5, 2, 5]))
            np.testing.assert_array_equal(Xs, X[[5, 2, 5]])
            np.testing.assert_array_equal(ndx, [5, 2, 5])


def test_fields_pick_and_order_a_sources_arrays_and_bad_names_are_refused(server):
    X, y = make_demo_arrays()
    with batchup_client.connect(server.endpoint) as client:
        idx = np.array([3, 1, 4])
        (ys,) = client.source("demo", fields="y").samples_by_indices(idx)  # one name, not its letters
        np.testing.assert_array_equal(ys, y[idx])
        ys, Xs = client.source("demo", fields=["y", "X"]).samples_by_indices(idx)
        np.testing.assert_array_equal(ys, y[idx])
        np.testing.assert_array_equal(Xs, X[idx])
        with pytest.raises(ValueError, match=r"source 'demo' has no field\(s\) \['Z'\]; it has \['X', 'y'\]"):
            client.source("demo", fields=["X", "Z"])
        with pytest.raises(ValueError, match="has no field"):
            client.source("demo", fields="Xy")  # once split into "X" and "y"
        for bad in ([0], 5, [b"X"]):
            with pytest.raises(TypeError, match="fields should be a list of field names"):
                client.source("demo", fields=bad)
        (xs,) = client.source("demo", fields=("X",)).samples_by_indices(idx)  # the client still works
        np.testing.assert_array_equal(xs, X[idx])


def test_one_client_interleaves_train_and_validation_streams(server):
    X, y = make_demo_arrays()
    with batchup_client.connect(server.endpoint) as client:
        train = client.source("demo", repeats=-1).batch_iterator(
            batch_size=100, shuffle=np.random.RandomState(1)
        )
        val = client.source("demo", indices=np.arange(1000)).batch_iterator(batch_size=128)
        train_ref = data_source.RandomAccessDataSource(len(X), repeats=-1).batch_indices_iterator(
            100, shuffle=np.random.RandomState(1)
        )
        for (vx, vy), i in zip(val, range(0, 1000, 128)):
            tx, ty = next(train)
            idx = next(train_ref)
            np.testing.assert_array_equal(tx, X[idx])
            np.testing.assert_array_equal(vx, X[i : min(i + 128, 1000)])
            np.testing.assert_array_equal(vy, y[i : min(i + 128, 1000)])
        train.close()


def test_four_clients_at_once_each_get_exactly_their_batches(server):
    X, y = make_demo_arrays()
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            with batchup_client.connect(server.endpoint) as client:
                src = client.source("demo")
                results[seed] = list(src.batch_iterator(batch_size=256, shuffle=np.random.RandomState(seed)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for seed in range(4):
        assert_same(results[seed], expected_batches([X, y], 256, seed))


def test_client_arrays_upload_once_and_are_keyed_by_content(server):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(1000, 37)).astype(">f8")  # big-endian survives the trip
    y = rng.randint(0, 3, size=1000).astype(np.int16)
    with batchup_client.connect(server.endpoint, share_memory=False) as client:
        src = client.array_source([X, y])
        got = list(src.batch_iterator(batch_size=300, shuffle=np.random.RandomState(5)))
        assert client.info()["arrays_uploaded"] == 2
        assert client.info()["array_transfer"] == "chunked upload"
        assert_same(got, expected_batches([X, y], 300, 5))
    with batchup_client.connect(server.endpoint, share_memory=False) as again:
        again.array_source([X.copy(), y.copy()])  # same content, other objects
        assert again.info()["arrays_uploaded"] == 0 and again.info()["arrays_reused"] == 2


def test_upload_in_several_chunks(server, monkeypatch):
    from batchup_client import connection

    monkeypatch.setattr(connection, "UPLOAD_CHUNK_BYTES", 4096)
    X = np.arange(50000, dtype=np.float32).reshape(5000, 10)
    with batchup_client.connect(server.endpoint, share_memory=False) as client:
        src = client.array_source([X])
        (got,) = src.samples_by_indices(np.array([4999, 0, 1234]))
        np.testing.assert_array_equal(got, X[[4999, 0, 1234]])


def test_same_host_client_arrays_go_through_shared_memory(server):
    X = np.arange(3000, dtype=np.int32).reshape(1000, 3)
    with batchup_client.connect(server.endpoint) as client:
        assert client.info()["array_transfer"] == "shared-memory file"
        src = client.array_source([X])
        assert client.info()["arrays_shared"] == 1 and client.info()["bytes_uploaded"] == 0
        batches = list(src.batch_iterator(batch_size=400))
        np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), X)


def test_drop_in_sees_in_place_updates_between_epochs(server, monkeypatch):
    monkeypatch.setenv("BATCHUP_SERVER", server.endpoint)
    monkeypatch.setattr(batchup_client, "_default", None)
    X = np.arange(100, dtype=np.float32).reshape(50, 2)
    y = np.zeros(50, dtype=np.int32)
    ds = data_source.ArrayDataSource([X, y])
    try:
        first = np.concatenate([b[1] for b in ds.batch_iterator(batch_size=16)])
        y[:] = 7  # pseudo-labelling writes new labels in place
        second = np.concatenate([b[1] for b in ds.batch_iterator(batch_size=16)])
    finally:
        batchup_client.default_client().close()
    assert (first == 0).all() and (second == 7).all()


def test_result_does_not_depend_on_worker_count(tmp_path):
    outs = []
    for workers in ("1", "3"):
        with RunningServer("--workers", workers) as srv:
            with batchup_client.connect(srv.endpoint) as client:
                src = client.source("demo", repeats=2)
                outs.append(list(src.batch_iterator(batch_size=999, shuffle=np.random.RandomState(4))))
    assert_same(outs[0], outs[1])


def test_ipc_endpoint(tmp_path):
    with RunningServer("--bind", f"ipc://{tmp_path}/ctl", "--workers", "1") as srv:
        with batchup_client.connect(srv.endpoint) as client:
            assert client.info()["transport"] == "ipc"
            assert len(list(client.source("demo").batch_iterator(batch_size=4000))) == 3


def test_ping_answers_when_a_server_runs(server):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "batchup_server", "ping", server.endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "answered" in out.stdout


def test_examples_train_loss_goes_down(server):
    import re
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "examples/train.py", "--server", server.endpoint, "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert out.returncode == 0, out.stderr
    losses = [float(x) for x in re.findall(r"train loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert "batches/s received" in out.stdout


def test_arrays_the_server_holds_are_not_asked_about_again(server):
    """A second stream over the same arrays opens without a HaveArrays round trip (the
    server keeps what it was given); other arrays are still asked about and sent."""
    X = np.arange(600, dtype=np.float32).reshape(200, 3)
    with batchup_client.connect(server.endpoint, share_memory=False) as client:
        asked: list[list[str]] = []
        send = client._send

        def spy(msg, arrays=()):
            if isinstance(msg, proto.HaveArrays):
                asked.append(list(msg.keys))
            send(msg, arrays)

        client._send = spy
        src = client.array_source([X])
        first = list(src.batch_iterator(batch_size=64, shuffle=np.random.RandomState(1)))
        again = client.array_source([X.copy()])  # same content: its key is known
        second = list(again.batch_iterator(batch_size=64, shuffle=np.random.RandomState(1)))
        other = client.array_source([X + 1])
        third = list(other.batch_iterator(batch_size=64))
        uploaded = client.info()["arrays_uploaded"]
    assert len(asked) == 2, asked  # X once, X + 1 once
    assert uploaded == 2
    assert_same(second, first)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in third]), X + 1)
