"""Client arrays on a server: kept while streams use them, kept unused up to the server's
``idle_array_bytes`` (least recently used deleted first, none asked for within
``client_timeout``), and sent again by the client when it needs one the server deleted."""

from __future__ import annotations

import glob
import os
import time
from typing import Any

import batchup.data_source as bds
import numpy as np
import pytest

import batchup_client
from tests.servers import RunningServer, wait_until, worker_pids

pytestmark = pytest.mark.integration

N = 50_000  # X: 50,000 x 8 float32 = 1.6 MB, over the 1 MB budget of the small server
RS = np.random.RandomState(0)


def _arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(seed)
    return rs.normal(size=(N, 8)).astype(np.float32), rs.randint(0, 10, size=N).astype(np.int64)


def _server(tmp_path: Any, idle_bytes: int) -> RunningServer:
    cfg = tmp_path / "s.toml"
    # an array unused for client_timeout (1.5 s here) may go
    cfg.write_text(
        f"[server]\nidle_array_bytes = {idle_bytes}\nheartbeat_interval = 0.25\nclient_timeout = 1.5\n"
    )
    return RunningServer("--config", str(cfg), "--workers", "2", "--no-demo")


def _epoch(src: Any, data: list[np.ndarray], seed: int) -> None:
    """One shuffled epoch of ``src`` equals batchup's over ``data``."""
    want = bds.ArrayDataSource(data).batch_iterator(4096, shuffle=np.random.RandomState(seed))
    got = src.batch_iterator(4096, shuffle=np.random.RandomState(seed))
    n = 0
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            np.testing.assert_array_equal(a, b)
        n += 1
    assert n == -(-N // 4096)


def _key_files(client: Any, key: str) -> list[str]:
    return glob.glob(os.path.join(client.welcome.shm_dir, key.replace(":", "-") + ".npy"))


def _mapped_deleted(server: RunningServer, folder: str) -> list[str]:
    """Deleted files of ``folder`` that the server or its workers still map."""
    found = []
    for pid in [server.pid, *worker_pids(server.pid)]:
        with open(f"/proc/{pid}/maps") as f:
            found += [line.split(None, 5)[-1].strip() for line in f if folder in line and "(deleted)" in line]
    return found


@pytest.mark.parametrize("share", [True, False], ids=["shared-file", "uploaded"])
def test_an_unused_array_over_the_budget_is_deleted_and_sent_again(tmp_path: Any, share: bool) -> None:
    with _server(tmp_path, 1 << 20) as server:
        with batchup_client.connect(server.endpoint, share_memory=share) as client:
            data = list(_arrays(1))
            src = client.array_source(data)
            keys = src.source_ref["arrays"]
            _epoch(src, data, 5)  # streamed (in use), then unused: 1.6 MB over the 1 MB kept
            assert _key_files(client, keys[0])  # not yet: it was just used
            wait_until(lambda: not _key_files(client, keys[0]), what="the unused X to be deleted")
            assert _key_files(client, keys[1])  # the labels (400 kB) fit the budget
            sent = client.info()["arrays_shared" if share else "arrays_uploaded"]
            _epoch(src, data, 6)  # the client sends X again, unasked by the user
            assert client.info()["arrays_shared" if share else "arrays_uploaded"] == sent + 1
            assert not _mapped_deleted(server, client.welcome.shm_dir)  # workers let go of it
    assert "deleted" in "".join(server.lines)


def test_arrays_within_the_budget_stay_and_least_recently_used_go_first(tmp_path: Any) -> None:
    with _server(tmp_path, 4_500_000) as server:  # two unused X + y pairs (2 MB each), not three
        with batchup_client.connect(server.endpoint) as client:
            pairs = [list(_arrays(seed)) for seed in (1, 2, 3)]
            sources = [client.array_source(d) for d in pairs]
            for src, d in zip(sources[:2], pairs[:2]):
                _epoch(src, d, 7)
            reused = client.info()["arrays_reused"]
            sources[0].samples_by_indices(np.arange(3))  # pair 0 is now the more recently used
            _epoch(sources[2], pairs[2], 9)  # the third pair pushes the oldest X out: pair 1's
            x_keys = [s.source_ref["arrays"][0] for s in sources]
            wait_until(lambda: not _key_files(client, x_keys[1]), what="the least recently used X to go")
            assert [bool(_key_files(client, k)) for k in x_keys] == [True, False, True]
            assert _key_files(client, sources[1].source_ref["arrays"][1])  # then within the budget
            assert client.info()["arrays_reused"] == reused  # nothing was asked or sent again


def test_an_array_changed_after_it_was_deleted_is_a_clear_error(tmp_path: Any) -> None:
    with _server(tmp_path, 0) as server:  # nothing unused is kept
        with batchup_client.connect(server.endpoint) as client:
            data = list(_arrays(1))
            src = client.array_source(data)
            _epoch(src, data, 5)
            wait_until(lambda: not _key_files(client, src.source_ref["arrays"][0]), what="X to be deleted")
            data[0][0, 0] += 1.0  # the user changes the array in place; the server has none
            with pytest.raises(ValueError, match="changed since it was handed"):
                next(iter(src.batch_iterator(64)))
            fresh = client.array_source(data)  # what the message says to do
            _epoch(fresh, data, 6)


def test_an_array_in_use_is_never_deleted(tmp_path: Any) -> None:
    """A stream being read keeps its arrays while other arrays come and go around it."""
    with _server(tmp_path, 0) as server:
        with batchup_client.connect(server.endpoint) as client:
            data = list(_arrays(1))
            src = client.array_source(data)
            it = src.batch_iterator(1024, shuffle=np.random.RandomState(3))
            first = [a.copy() for a in next(it)]
            for seed in (2, 3):  # other arrays streamed and deleted meanwhile
                other = list(_arrays(seed))
                source = client.array_source(other)
                _epoch(source, other, seed)
                key = source.source_ref["arrays"][0]
                wait_until(lambda k=key: not _key_files(client, k), what="the other X to be deleted")
            assert _key_files(client, src.source_ref["arrays"][0])
            rest = [[a.copy() for a in b] for b in it]
        want = list(bds.ArrayDataSource(data).batch_iterator(1024, shuffle=np.random.RandomState(3)))
        for g, w in zip([first, *rest], want, strict=True):
            for a, b in zip(g, w, strict=True):
                np.testing.assert_array_equal(a, b)


def test_a_drop_in_source_rewritten_every_epoch_does_not_fill_the_server(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pseudo-labelling: the labels change in place every epoch, so each epoch hands the
    server another array. Before, a long-running server kept every version; now the unused
    ones go beyond idle_array_bytes, and each epoch still sees its own labels."""
    from batchup_client import data_source

    server = _server(tmp_path, 0)
    monkeypatch.setenv("BATCHUP_SERVER", server.endpoint)
    monkeypatch.setattr(batchup_client, "_default", None)
    X, y = _arrays(1)
    ds = data_source.ArrayDataSource([X, y])
    try:
        folder = batchup_client.default_client().welcome.shm_dir
        for epoch in range(6):
            y[:] = epoch  # new labels in place: a new array for the server
            got = np.concatenate([b[1] for b in ds.batch_iterator(batch_size=8192)])
            assert (got == epoch).all()
            if epoch >= 2:  # older versions of y go (each unused after client_timeout)
                wait_until(
                    lambda: len(glob.glob(os.path.join(folder, "sha256-*.npy"))) <= 3,
                    what="old label arrays to be deleted",
                )
    finally:
        batchup_client.default_client().close()
        server.stop()


def test_an_array_read_for_longer_than_client_timeout_counts_as_used_until_its_stream_closed(
    tmp_path: Any,
) -> None:
    """A stream open longer than client_timeout: its arrays were used until it closed, so
    they are not deleted the moment it does (an epoch, then a validation pass, would
    otherwise send the training set again every epoch)."""
    with _server(tmp_path, 1 << 20) as server:
        with batchup_client.connect(server.endpoint) as client:
            data = list(_arrays(1))
            src = client.array_source(data)
            key = src.source_ref["arrays"][0]
            it = src.batch_iterator(4096)
            next(it)
            time.sleep(2.0)  # noqa: sleep-ok (a stream read for longer than client_timeout, 1.5 s)
            list(it)  # closed now
            time.sleep(0.75)  # noqa: sleep-ok (three eviction rounds of 0.25 s go by)
            assert _key_files(client, key)  # used 0.75 s ago: kept
            wait_until(lambda: not _key_files(client, key), what="X unused for client_timeout to go")


def test_arrays_given_as_lists_are_sent_again_too(tmp_path: Any) -> None:
    with _server(tmp_path, 0) as server:
        with batchup_client.connect(server.endpoint) as client:
            X, y = _arrays(1)
            src = client.array_source([X, y.tolist()])  # labels as a Python list
            _epoch(src, [X, y], 5)
            wait_until(lambda: not _key_files(client, src.source_ref["arrays"][1]), what="y to be deleted")
            _epoch(src, [X, y], 6)
