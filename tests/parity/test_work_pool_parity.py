"""work_pool drop-in against batchup 0.2.3: same batches, same (eager) RNG draws."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from batchup import data_source as bds
from batchup import work_pool as bwp

from batchup_client import data_source as cds
from batchup_client import work_pool as cwp


@pytest.fixture(scope="module")
def batchup_pool() -> Any:
    return bwp.WorkerThreadPool(processes=2)  # batchup's pools cannot be shut down


def data(n: int = 57) -> list[np.ndarray]:
    r = np.random.RandomState(4)
    return [r.standard_normal((n, 5)).astype(np.float32), np.arange(n, dtype=np.int64)]


@pytest.mark.parametrize("pool_cls", [cwp.WorkerThreadPool, cwp.WorkerProcessPool])
@pytest.mark.parametrize("buffer", [1, 3, 20])
@pytest.mark.parametrize("repeats", [1, 3])
def test_parallel_data_source_matches_batchup(
    batchup_pool: Any, pool_cls: Any, buffer: int, repeats: int
) -> None:
    X, y = data()
    ref = batchup_pool.parallel_data_source(
        bds.ArrayDataSource([X, y], repeats=repeats), batch_buffer_size=buffer
    )
    with pool_cls(processes=2) as pool:
        ours = pool.parallel_data_source(
            cds.ArrayDataSource([X, y], repeats=repeats), batch_buffer_size=buffer
        )
        r_ref, r_ours = np.random.RandomState(8), np.random.RandomState(8)
        it_ref = ref.batch_iterator(10, shuffle=r_ref)
        it_ours = ours.batch_iterator(10, shuffle=r_ours)
        # eager, as batchup: the first buffer's permutations are drawn at the call
        assert np.array_equal(r_ours.get_state()[1], r_ref.get_state()[1])
        got = list(it_ours)
        want = list(it_ref)
        assert ours.num_samples() == ref.num_samples()
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    assert np.array_equal(r_ours.get_state()[1], r_ref.get_state()[1])


def test_parallel_data_source_rejects_what_batchup_rejects() -> None:
    with cwp.WorkerThreadPool() as pool:
        with pytest.raises(TypeError, match="ds must implement"):
            pool.parallel_data_source([np.zeros(3)])
        with pytest.raises(TypeError, match="ds must be random access"):
            pool.parallel_data_source(cds.IteratorDataSource(iter([])))
    with pytest.raises(ValueError, match="closed"):
        pool.parallel_data_source(cds.ArrayDataSource(data()))


def test_work_stream_runs_tasks_in_order() -> None:
    with cwp.WorkerThreadPool(processes=2) as pool:
        ws = pool.work_stream(((pow, (i, 2)) for i in range(30)), task_buffer_size=4)
        assert list(ws.retrieve_iter()) == [i * i for i in range(30)]
        assert ws.retrieve() is None
