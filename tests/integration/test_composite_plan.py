"""Composites as one plan on the server: one stream (one credit window) for the whole
composite, batchup's batches and RNG, and the client-side composition as the fallback."""

from __future__ import annotations

import os
from typing import Any

import batchup.data_source as bds
import numpy as np
import pytest

import batchup_client
import batchup_protocol as proto
from batchup_client import data_source
from tests.servers import RunningServer, worker_pids, write_train_source

pytestmark = pytest.mark.integration

X = np.arange(400 * 3, dtype=np.float32).reshape(400, 3)
Y = np.arange(400) % 10


def _eq(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_eq(x, z) for x, z in zip(a, b))
    return a.dtype == b.dtype and np.array_equal(a, b)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cfg = write_train_source(tmp_path_factory.mktemp("comp"), X, Y)
    srv = RunningServer("--config", cfg, "--trust-client-code")
    try:
        yield srv
    finally:
        srv.stop()


def test_semi_supervised_composite_is_one_stream_with_batchups_batches(server: Any) -> None:
    labelled = np.random.RandomState(0).permutation(400)[:30]
    with batchup_client.connect(server.endpoint) as client:
        lab = client.source("train", indices=labelled, repeats=-1)
        unl = client.source("train", fields=["X"], include_indices=True)
        comp = data_source.CompositeDataSource([lab, unl])
        before = client.info()["streams_opened"]
        rng = np.random.RandomState(4)
        got = list(comp.batch_iterator(batch_size=32, shuffle=rng))
        assert client.info()["streams_opened"] - before == 1
    blab = bds.ArrayDataSource([X, Y], indices=labelled, repeats=-1)
    bunl = bds.ArrayDataSource([X], include_indices=True)
    want_rng = np.random.RandomState(4)
    want = list(bds.CompositeDataSource([blab, bunl]).batch_iterator(32, shuffle=want_rng))
    assert len(got) == len(want) == 13
    assert all(_eq(g, w) for g, w in zip(got, want))
    assert rng.randint(1 << 30) == want_rng.randint(1 << 30)


def test_nested_unflattened_untrimmed_composites(server: Any) -> None:
    with batchup_client.connect(server.endpoint) as client:
        a = client.source("train", indices=np.arange(50))
        b = client.source("train", fields=["y"])
        inner = data_source.CompositeDataSource(
            [b, client.source("train", fields=["X"])], flatten=False, trim=False
        )
        comp = data_source.CompositeDataSource([a, inner], flatten=False, trim=False)
        before = client.info()["streams_opened"]
        got = list(comp.batch_iterator(batch_size=16))
        assert client.info()["streams_opened"] - before == 1
    ba = bds.ArrayDataSource([X, Y], indices=np.arange(50))
    binner = bds.CompositeDataSource(
        [bds.ArrayDataSource([Y]), bds.ArrayDataSource([X])], flatten=False, trim=False
    )
    want = list(bds.CompositeDataSource([ba, binner], flatten=False, trim=False).batch_iterator(16))
    assert len(got) == len(want) and all(_eq(g, w) for g, w in zip(got, want))


def test_a_map_over_a_composite_runs_in_the_servers_workers(server: Any) -> None:
    def tag(X1: Any, y1: Any, X2: Any) -> Any:
        return X1 + X2, y1, np.full(len(y1), os.getpid())

    with batchup_client.connect(server.endpoint) as client:
        comp = data_source.CompositeDataSource([client.source("train"), client.source("train", fields=["X"])])
        got = list(comp.map(tag).batch_iterator(batch_size=50, shuffle=np.random.RandomState(1)))
    want = list(
        bds.CompositeDataSource([bds.ArrayDataSource([X, Y]), bds.ArrayDataSource([X])])
        .map(lambda a, b, c: (a + c, b))
        .batch_iterator(50, shuffle=np.random.RandomState(1))
    )
    assert len(got) == len(want) == 8
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g[0], w[0])
        np.testing.assert_array_equal(g[1], w[1])
    assert {int(g[2][0]) for g in got} <= set(worker_pids(server.pid))


def test_a_child_that_cannot_travel_falls_back_to_composing_here(server: Any) -> None:
    with batchup_client.connect(server.endpoint) as client:
        mapped = client.source("train").map(lambda x, y: (x * 2, y), where="client")
        comp = data_source.CompositeDataSource([mapped, client.source("train", fields=["y"])])
        before = client.info()["streams_opened"]
        got = list(comp.batch_iterator(batch_size=64, shuffle=np.random.RandomState(2)))
        assert client.info()["streams_opened"] - before == 2
    bm = bds.ArrayDataSource([X, Y]).map(lambda x, y: (x * 2, y))
    want = list(
        bds.CompositeDataSource([bm, bds.ArrayDataSource([Y])]).batch_iterator(
            64, shuffle=np.random.RandomState(2)
        )
    )
    assert all(_eq(g, w) for g, w in zip(got, want))


def test_one_plan_composites_shard_after_trimming(server: Any) -> None:
    with batchup_client.connect(server.endpoint) as client:
        comp = data_source.CompositeDataSource(
            [client.source("train", indices=np.arange(20), repeats=-1), client.source("train", fields=["X"])]
        )
        ranks = [
            list(comp.batch_iterator(batch_size=8, shuffle=np.random.RandomState(3), rank=r, world_size=2))
            for r in range(2)
        ]
    want = list(
        bds.CompositeDataSource(
            [bds.ArrayDataSource([X, Y], indices=np.arange(20), repeats=-1), bds.ArrayDataSource([X])]
        ).batch_iterator(16, shuffle=np.random.RandomState(3))
    )
    assert len(ranks[0]) == len(ranks[1]) == len(want)
    for g, w in enumerate(want):
        for part in range(3):
            np.testing.assert_array_equal(np.concatenate([ranks[0][g][part], ranks[1][g][part]]), w[part])


@pytest.mark.parametrize(
    "source, plan, code",
    [
        (
            {"composite": [{"source": {"name": "train"}}]},
            {"kind": "standard", "length": 400},
            "INVALID_ARGUMENT",
        ),
        (
            {"composite": [{"source": {"composite": []}}]},
            {"kind": "composite", "children": [{}]},
            "MALFORMED",
        ),
        ({"composite": []}, {"kind": "composite", "children": []}, "MALFORMED"),
        (
            {"composite": [{"source": {"name": "train"}, "fields": ["nope"]}]},
            {"kind": "composite", "children": [{"kind": "standard", "length": 400}]},
            "INVALID_ARGUMENT",
        ),
        (
            {"composite": [{"source": {"name": "train"}}]},
            {"kind": "composite", "children": [{"kind": "standard", "length": 399}]},
            "INVALID_ARGUMENT",
        ),
    ],
)
def test_bad_composite_requests_are_refused(server: Any, source: Any, plan: Any, code: str) -> None:
    with batchup_client.connect(server.endpoint) as client:
        with pytest.raises(batchup_client.RemoteError) as info:
            client.request(lambda rid: proto.OpenStream(rid, 77, source, plan, 8, False, 4, 1 << 20))
        assert info.value.code == proto.ErrorCode[code]
        assert len(client.source("train")) == 400  # still serving
