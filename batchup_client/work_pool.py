"""batchup 0.2.3's ``work_pool`` API (drop-in), backed by the server's worker processes.

``pool.parallel_data_source(ds, batch_buffer_size=K)`` keeps batchup scripts working:
batches are still gathered by the server's workers (the source streams as usual), and
the iterator keeps ``K`` batches ahead exactly as batchup's ``WorkStream`` does, so the
caller's RNG advances as batchup's would (the first pass is drawn at the
``batch_iterator`` call, not at the first ``next``). ``work_stream`` runs arbitrary
``(fn, args)`` tasks on local threads, in order.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator
from typing import Any

from . import data_source

__all__ = ["AbstractWorkerPool", "ParallelDataSource", "WorkStream", "WorkerProcessPool", "WorkerThreadPool"]


class AbstractWorkerPool:
    """A pool as batchup's, whose data work runs in the batchup-server's workers."""

    def __init__(self, processes: int = 1):
        self.processes = processes
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this worker pool is closed")

    def shared_constant(self, x: Any) -> Any:
        return x

    def _apply_async(self, fn: Any, args: tuple[Any, ...]) -> concurrent.futures.Future[Any]:
        self._check_open()
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.processes)
        return self._executor.submit(fn, *args)

    def work_stream(self, task_generator: Iterator[Any], task_buffer_size: int = 20) -> WorkStream:
        return WorkStream(self, task_generator, task_buffer_size=task_buffer_size)

    def parallel_data_source(self, ds: Any, batch_buffer_size: int = 20) -> ParallelDataSource:
        self._check_open()
        return ParallelDataSource(ds, batch_buffer_size, self)

    def close(self) -> None:
        """Stop the pool's local threads (batchup's pools have no such call). Idempotent."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> AbstractWorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class WorkerThreadPool(AbstractWorkerPool):
    """``batchup.work_pool.WorkerThreadPool(processes)``."""


class WorkerProcessPool(AbstractWorkerPool):
    """``batchup.work_pool.WorkerProcessPool(processes)``: the processes are the server's."""


class WorkStream:
    """Runs ``(fn, args)`` tasks from a generator, ``task_buffer_size`` ahead, in order."""

    def __init__(
        self, worker_pool: AbstractWorkerPool, task_generator: Iterator[Any], task_buffer_size: int = 20
    ):
        assert isinstance(worker_pool, AbstractWorkerPool)
        self._pool = worker_pool
        self._tasks = task_generator
        self._size = task_buffer_size
        self._buffer: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        self._fill()

    def _fill(self) -> None:
        while len(self._buffer) < self._size:
            try:
                fn, args = next(self._tasks)
            except StopIteration:
                return
            self._buffer.append(self._pool._apply_async(fn, args))

    def retrieve(self) -> Any:
        if not self._buffer:
            return None
        result = self._buffer.popleft().result()
        self._fill()
        return result

    def retrieve_iter(self) -> Iterator[Any]:
        while self._buffer:
            yield self.retrieve()


class ParallelDataSource(data_source.AbstractDataSource):
    """``pool.parallel_data_source(ds)``: ``ds``'s batches, kept ``batch_buffer_size`` ahead."""

    def __init__(self, ds: Any, batch_buffer_size: int, pool: AbstractWorkerPool):
        if not isinstance(ds, data_source.AbstractDataSource):
            raise TypeError("ds must implement `data_source.AbstractDataSource`")
        if not ds.is_random_access:
            raise TypeError(f"ds must be random access; it is of type {type(ds)}")
        self._ds = ds
        self._size = batch_buffer_size
        self._pool = pool

    def num_samples(self, **kwargs: Any) -> Any:
        return self._ds.num_samples(**kwargs)

    def batch_iterator(self, batch_size: int, **kwargs: Any) -> Iterator[Any]:
        """Not a generator, as batchup's: the first ``batch_buffer_size`` batches are
        requested (and the RNG drawn for them) at this call."""
        source = self._ds.batch_iterator(batch_size, **kwargs)
        buffer = collections.deque(b for _, b in zip(range(self._size), source))
        return self._drain(source, buffer)

    @staticmethod
    def _drain(source: Iterator[Any], buffer: collections.deque[Any]) -> Iterator[Any]:
        while buffer:
            batch = buffer.popleft()
            buffer.extend(b for _, b in zip(range(1), source))  # top up first, as batchup
            yield batch
