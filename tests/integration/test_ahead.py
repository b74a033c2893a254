"""The next epoch's stream, opened ahead (protocol 1.6), through a real server: a training
loop's epochs are still batchup 0.2.3's, RNG included, whether the stream opened ahead
is taken over or closed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from batchup import data_source as bds

import batchup_client
import batchup_protocol as proto
from batchup_server.demo import make_demo_arrays

pytestmark = pytest.mark.integration


def assert_epoch(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w)
        for a, b in zip(g, w, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("share_memory", [True, False], ids=["shared-memory", "socket"])
def test_training_and_validation_loops_take_over_their_next_epochs(server, share_memory):
    X, y = make_demo_arrays()
    train_idx, val_idx = np.arange(0, 9000), np.arange(9000, len(X))
    ref_train = bds.ArrayDataSource([X, y], indices=train_idx)
    ref_val = bds.ArrayDataSource([X, y], indices=val_idx)
    mine, ref = np.random.RandomState(21), np.random.RandomState(21)
    with batchup_client.connect(server.endpoint, share_memory=share_memory) as client:
        train = client.source("demo", indices=train_idx)
        val = client.source("demo", indices=val_idx)
        for _ in range(4):
            got = list(train.batch_iterator(batch_size=128, shuffle=mine))
            assert_epoch(got, list(ref_train.batch_iterator(128, shuffle=ref)))
            assert proto.states_equal(mine.get_state(), ref.get_state())
            assert_epoch(list(val.batch_iterator(batch_size=500)), list(ref_val.batch_iterator(500)))
        info = client.info()
        # epochs 3 and 4 of each loop were opened ahead, while epochs 2 and 3 were read
        assert info["streams_taken_over"] == 4 and info["streams_ahead_closed"] == 0
        assert info["streams_ahead_open"] == 2 and info["open_streams"] == 2  # epoch 5's of each
        assert info["batch_transport"] == ("shared memory" if share_memory else "tcp socket")


def test_a_loop_that_draws_between_epochs_gets_batchups_batches(server):
    X, y = make_demo_arrays()
    ref_ds = bds.ArrayDataSource([X, y], repeats=2)
    mine, ref = np.random.RandomState(4), np.random.RandomState(4)
    with batchup_client.connect(server.endpoint) as client:
        src = client.source("demo", repeats=2)
        for e in range(4):
            got = list(src.batch_iterator(batch_size=256, shuffle=mine))
            assert_epoch(got, list(ref_ds.batch_iterator(256, shuffle=ref)))
            if e == 2:
                mine.randint(10), ref.randint(10)  # e.g. a random validation subset
        assert proto.states_equal(mine.get_state(), ref.get_state())
        info = client.info()
        assert info["streams_taken_over"] == 1 and info["streams_ahead_closed"] == 1


def _deleted_pool_mappings() -> int:
    with open("/proc/self/maps") as f:
        return len(
            {line.split()[-2] for line in f if "/pool-" in line and line.rstrip().endswith("(deleted)")}
        )


def test_pools_the_server_removed_are_unmapped(server):
    """Five loops of different batch sizes (their streams opened ahead too): the server keeps
    four idle pools per client and deletes older ones; the client unmaps those instead of
    holding every pool it ever saw."""
    import gc

    with batchup_client.connect(server.endpoint) as client:
        assert client.info()["batch_transport"] == "shared memory"
        src = client.source("demo")
        for _ in range(6):
            for bs in (16, 32, 48, 64, 80):
                for _batch in src.batch_iterator(batch_size=bs):
                    pass
        gc.collect()
        assert client.info()["streams_opened"] > 30
        assert _deleted_pool_mappings() <= 4


@pytest.mark.parametrize("share_memory", [True, False], ids=["shared-memory", "socket"])
def test_a_start_credit_holds_a_stream_to_that_many_batches_until_a_credit(server, share_memory):
    plan = {"kind": "standard", "length": 12000, "repeats": 1}
    with batchup_client.connect(server.endpoint, share_memory=share_memory) as client:
        for bad in (0, 17, -2):
            with pytest.raises(batchup_client.InvalidArgumentError, match="start_credit should be -1 or in"):
                client.open_stream({"name": "demo"}, plan, [], 50, False, None, 16, 1 << 24, start_credit=bad)
        sid = client.open_stream({"name": "demo"}, plan, [], 50, False, None, 16, 1 << 24, start_credit=3)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # two seconds for batches beyond the three
            client.poll_data(0.05)
        assert client.buffered(sid) == 3 and not client.ready(sid, 3)
        client.send_credit(sid, 13, 0)  # the rest of its 16
        got = [client.next_item(sid, seq)[0].seq for seq in range(16)]
        assert got == list(range(16))
        client.close_stream(sid)


def test_no_stream_is_opened_ahead_of_a_server_before_16(server, monkeypatch):
    """A 1.5 server tells no final RNG state and would ignore a start credit: the client
    sees its version in Welcome (here: the check made to read 1.6 as older) and opens none."""
    from batchup_client import connection

    monkeypatch.setattr(connection.proto, "opens_ahead", lambda version: False)
    with batchup_client.connect(server.endpoint) as client:
        assert client.opens_ahead is False
        src = client.source("demo")
        for _ in range(3):
            for _batch in src.batch_iterator(batch_size=500):
                pass
        assert client.info()["streams_opened_ahead"] == 0 and client.info()["streams_opened"] == 3
