"""Bundles (protocol 1.3) over a real server: a 1.3 client gets several batches per
ZeroMQ message, each exactly once and in order; a 1.2 client gets one per message."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import zmq

import batchup_client
import batchup_protocol as proto

from .test_bad_input import RawPeer

pytestmark = pytest.mark.integration


def test_small_batches_come_bundled_exactly_once_in_order(server):
    with batchup_client.connect(server.endpoint) as client:
        src = client.source("demo", include_indices=True)
        n = src.num_samples()
        seen = [ndx for ndx, *_ in src.batch_iterator(batch_size=10)]
        info = client.info()
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(n))
    assert len(seen) == -(-n // 10)
    assert info["bundled"] > 0, info
    assert info["data_messages"] < len(seen), "every batch came in a message of its own"


def test_a_1_2_client_gets_one_message_per_zeromq_message(server):
    peer = RawPeer(server.endpoint)
    try:
        welcome = peer.hello(version=(1, 2))
        assert isinstance(welcome, proto.Welcome) and welcome.version == list(proto.PROTOCOL_VERSION)
        plan = {"kind": "standard", "length": 12000, "repeats": 1}
        peer.send(proto.OpenStream(1, 1, {"name": "demo"}, plan, 10, True, 64, 1 << 30))
        assert isinstance(peer.recv(), proto.StreamOpened)
        seqs: list[int] = []
        rows: list[int] = []
        end = None
        while end is None or len(seqs) < end:
            assert peer.data.poll(10000), "no batch within 10 s"
            msg, arrays = proto.decode(peer.data.recv_multipart())  # raises on a bundle
            if isinstance(msg, proto.EndOfStream):
                end = msg.seq
                continue
            assert isinstance(msg, proto.Batch), msg
            seqs.append(msg.seq)
            rows += arrays[0].tolist()
            if len(seqs) % 16 == 0:
                peer.send(proto.Credit(1, 16, len(seqs)))
        assert end == 1200
        assert sorted(seqs) == list(range(1200))
        assert sorted(rows) == list(range(12000))
    finally:
        peer.data.setsockopt(zmq.LINGER, 0)
        peer.close()


def _slow(*arrays: Any) -> Any:  # a 4 ms augmentation
    time.sleep(0.004)  # noqa: sleep-ok (the cost of a transform, not a wait for the server)
    return arrays


def test_slow_batches_share_messages_exactly_once_in_order():
    """A transform of a few ms per batch: groups of several batches per task and bundles
    held for 1.5 batch-times, so batches still share messages (bundle_hold); each arrives
    exactly once and in order."""
    with batchup_client.connect() as client:  # the private server trusts this process's code
        src = client.source("demo", include_indices=True).map(_slow)
        seen = [ndx for ndx, *_ in src.batch_iterator(batch_size=200)]
        info = client.info()
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(src.num_samples()))
    assert info["bundled"] > 0, info
    assert info["data_messages"] < 0.8 * len(seen), info


def test_the_next_epoch_starts_with_the_measured_task_size(server):
    """An epoch's stream starts with tasks sized by the client's last stream of the same
    kind, not one batch per task until measured (its first task is not bundled, so its
    first batches go as soon as made). Batches stay batchup's, in order."""
    with batchup_client.connect(server.endpoint) as client:
        src = client.source("demo", include_indices=True)
        epochs = [
            [ndx for ndx, *_ in src.batch_iterator(batch_size=50, shuffle=np.random.RandomState(e))]
            for e in range(2)
        ]
    line = server.wait_for_log(r"stream \d+: tasks of \d+ batches from the start")
    assert int(line.split("tasks of ")[1].split()[0]) > 1, line
    for e, seen in enumerate(epochs):
        order = np.random.RandomState(e).permutation(src.num_samples())
        np.testing.assert_array_equal(np.concatenate(seen), order)
