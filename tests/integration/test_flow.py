"""Credit-based flow control, observed from a real client against a real server.

These tests receive batches as frames (``shared_memory_batches = False``): with shared
memory the pool's slots bound the batches in flight too (tests/integration/test_shared_memory.py).
"""

from __future__ import annotations

import numpy as np
import pytest

import batchup_client

pytestmark = pytest.mark.integration

DEMO_PLAN = {"kind": "standard", "length": 12000, "repeats": -1}
ROW_BYTES = 64 * 4 + 4  # demo X float32[64] + y int32


def drain(client):
    """Receive the first message (workers may still be starting), then until 0.5 s of quiet."""
    assert client.poll_data(15), "nothing arrived"
    received = 1
    while client.poll_data(0.5):
        received += 1
    return received


def test_server_never_sends_beyond_granted_batches(server):
    with batchup_client.connect(server.endpoint) as client:
        client.shared_memory_batches = False
        sid = client.open_stream({"name": "demo"}, DEMO_PLAN, [], 64, False, None, 4, 1 << 30)
        drain(client)
        assert client.buffered(sid) == 4
        client.send_credit(sid, 3, 0)  # three more, none consumed
        drain(client)
        assert client.buffered(sid) == 7
        client.close_stream(sid)


def test_byte_budget_bounds_batches_in_flight(server):
    with batchup_client.connect(server.endpoint) as client:
        client.shared_memory_batches = False
        budget = 64 * ROW_BYTES * 2  # room for two batches of 64
        sid = client.open_stream({"name": "demo"}, DEMO_PLAN, [], 64, False, None, 32, budget)
        drain(client)
        assert client.buffered(sid) == 2
        # one batch larger than the whole budget still flows, one at a time
        big = client.open_stream({"name": "demo"}, DEMO_PLAN, [], 4096, False, None, 8, 1000)
        drain(client)
        assert client.buffered(big) == 1


def test_stalled_stream_does_not_slow_the_others(server):
    with batchup_client.connect(server.endpoint) as client:
        client.shared_memory_batches = False
        stalled = client.open_stream({"name": "demo"}, DEMO_PLAN, [], 512, False, None, 2, 1 << 30)
        it = client.source("demo", repeats=3).batch_iterator(batch_size=100, shuffle=np.random.RandomState(0))
        assert sum(1 for _ in it) == 360
        assert client.buffered(stalled) == 2
    with batchup_client.connect(server.endpoint) as other:  # and other clients keep flowing
        assert sum(1 for _ in other.source("demo").batch_iterator(batch_size=100)) == 120


def test_consuming_returns_credit(server):
    with batchup_client.connect(server.endpoint) as client:
        client.shared_memory_batches = False
        it = client.source("demo", repeats=-1).batch_iterator(batch_size=10)
        for _ in range(500):  # far more batches than the window: credits come back
            next(it)
        it.close()
        assert client.info()["open_streams"] == 0  # closing the iterator released the stream


def test_small_byte_budget_with_many_batch_credits_streams_to_the_end(server):
    with batchup_client.connect(server.endpoint) as client:
        client.shared_memory_batches = False
        client.prefetch = (32, 2 * 100 * ROW_BYTES)  # two batches fit, credit batched by 8
        it = client.source("demo").batch_iterator(batch_size=100, shuffle=np.random.RandomState(2))
        assert sum(1 for _ in it) == 120


def test_the_client_asks_for_no_more_batch_credit_than_the_server_allows(server, tmp_path):
    """Welcome.max_credit_batches (1.5): the default client's deep prefetch is cut to what a
    server accepts, over the socket and through shared memory; asking for more is refused
    with the limit named."""
    from batchup.data_source import ArrayDataSource

    from tests.servers import RunningServer, write_train_source

    with batchup_client.connect(server.endpoint) as client:
        assert client.max_credit_batches == 256  # the server's default
    X = np.arange(300 * 4, dtype=np.float32).reshape(300, 4)
    Y = np.arange(300) % 7
    cfg = write_train_source(tmp_path, X, Y, "[server]\nmax_credit_batches = 16\n")
    want = list(ArrayDataSource([X, Y]).batch_iterator(5, shuffle=np.random.RandomState(1)))
    with RunningServer("--config", cfg) as srv, batchup_client.connect(srv.endpoint) as client:
        assert client.max_credit_batches == 16 and client.prefetch[0] > 16
        for shm in (False, True):
            client.shared_memory_batches = shm
            got = list(client.source("train").batch_iterator(5, shuffle=np.random.RandomState(1)))
            assert len(got) == len(want) == 60
            for (gx, gy), (wx, wy) in zip(got, want, strict=True):
                np.testing.assert_array_equal(gx, wx)
                np.testing.assert_array_equal(gy, wy)
        # the second epoch also opened a third ahead, for a next epoch never asked for
        assert client.info()["streams_shared_memory"] == 2 and client.info()["streams_ahead_open"] == 1
        plan = {"kind": "standard", "length": 300, "repeats": 1}
        with pytest.raises(
            batchup_client.InvalidArgumentError, match=r"credit_batches should be in \[1, 16\]"
        ):
            client.open_stream({"name": "train"}, plan, [], 5, False, None, 17, 1 << 20)
