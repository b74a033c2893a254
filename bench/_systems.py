"""The systems under test, as epoch functions for :func:`_common.measure_cell`.

An epoch function ``epoch(rng) -> (samples, batches)`` iterates one full shuffled epoch of
(X, y) batches and touches nothing but ``len(X)``: the benchmark measures delivery of
batches, not what a model does with them. Long-lived peers (servers, clients, the raw
PUSH process) are set up once; DataLoaders are made per cell and closed after it.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq
from _augment import where_probe
from _common import (
    BENCH_DIR,
    SEED,
    BatchesFn,
    Children,
    EpochFn,
    Settings,
    Workload,
    read_line,
    shielded,
)

Log = Callable[[str], None]

BATCHUP = "batchup 0.2.3 in-process"
BATCHUP_THREADS = "batchup 0.2.3 WorkerThreadPool(2)"
BATCHUP_PROCS = "batchup 0.2.3 WorkerProcessPool(2)"
TORCH_SAMPLE_0 = "DataLoader per-sample, 0 workers"
TORCH_SAMPLE_2 = "DataLoader per-sample, 2 workers"
TORCH_BATCH_0 = "DataLoader whole-batch, 0 workers"
TORCH_BATCH_2 = "DataLoader whole-batch, 2 workers"
SERVICE_TCP = "service tcp socket (named .npy source)"
SERVICE_IPC = "service ipc socket (named .npy source)"
SERVICE_SHM = "service shared memory (named .npy source, same host)"
SERVICE_DROPIN = "service drop-in (embedded server, shared memory)"
RAW_TCP = "raw pyzmq PUSH/PULL tcp"
RAW_IPC = "raw pyzmq PUSH/PULL ipc"
#: the service's work on the socket path without the service: gather, then send
RAW_TCP_GATHER = "raw pyzmq PUSH/PULL tcp, gathering each batch (np.take)"
#: the same with two sending processes sharing each epoch, as the service's two workers do
RAW_TCP_GATHER_2 = "raw pyzmq PUSH/PULL tcp, 2 PUSH processes gathering each batch (np.take)"

SYSTEMS = [
    BATCHUP,
    BATCHUP_THREADS,
    BATCHUP_PROCS,
    TORCH_SAMPLE_0,
    TORCH_SAMPLE_2,
    TORCH_BATCH_0,
    TORCH_BATCH_2,
    SERVICE_TCP,
    SERVICE_IPC,
    SERVICE_SHM,
    SERVICE_DROPIN,
    RAW_TCP,
    RAW_IPC,
    RAW_TCP_GATHER,
    RAW_TCP_GATHER_2,
]
TORCH_SYSTEMS = [TORCH_SAMPLE_0, TORCH_SAMPLE_2, TORCH_BATCH_0, TORCH_BATCH_2]
POOL_SYSTEMS = {"thread": BATCHUP_THREADS, "process": BATCHUP_PROCS}

# the augmentation workload (CIFAR-shaped, batch 256); the service rows' labels get
# "(map in …)" appended from where a probe map function ran
AUG_BATCHUP = "batchup 0.2.3 in-process, .map(augment)"
AUG_POOL = "batchup 0.2.3 WorkerProcessPool(2), .map(augment)"
AUG_TORCH = "DataLoader whole-batch, 2 workers, augment in the workers"
AUG_SERVICE_1 = "service, 1 server worker, shared memory, .map(augment)"
AUG_SERVICE_2 = "service, 2 server workers, shared memory, .map(augment)"
AUG_DROPIN = "service drop-in (embedded server), .map(augment)"
AUG_SYSTEMS = [AUG_BATCHUP, AUG_POOL, AUG_TORCH, AUG_SERVICE_1, AUG_SERVICE_2, AUG_DROPIN]
AUG_SERVICE_SYSTEMS = {AUG_SERVICE_1: "service", AUG_SERVICE_2: "service", AUG_DROPIN: "dropin"}


def _count(batches: Any) -> tuple[int, int]:
    samples = n = 0
    for batch in batches:
        samples += len(batch[0])
        n += 1
    return samples, n


def iterator_epoch(source: Any, batch_size: int) -> EpochFn:
    """``source.batch_iterator(batch_size, shuffle=rng)``: batchup's, the service's, the drop-in's."""

    def epoch(rng: np.random.RandomState) -> tuple[int, int]:
        return _count(source.batch_iterator(batch_size, shuffle=rng))

    return epoch


def iterator_batches(source: Any, batch_size: int) -> BatchesFn:
    """The batches of one shuffled epoch of ``source.batch_iterator``, for the training-step loop."""

    def batches(rng: np.random.RandomState) -> Any:
        return iter(source.batch_iterator(batch_size, shuffle=rng))

    return batches


def where_map_ran(source: Any, batch_size: int) -> dict[str, Any]:
    """Run ``source.map(where_probe)`` for one batch: which process ran the map function."""
    it = iter(source.map(where_probe).batch_iterator(batch_size, shuffle=np.random.RandomState(SEED)))
    try:
        pids = sorted({int(p) for p in np.asarray(next(it)[1]).ravel()})
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    where = "client" if pids == [os.getpid()] else "server workers"
    if os.getpid() in pids and len(pids) > 1:
        where = "client and server workers"
    return {"where": where, "pids": pids, "bench_pid": os.getpid()}


# ---------------------------------------------------------------------- batchup's worker pools
class BatchupPools:
    """batchup 0.2.3 worker pools by name; :meth:`close_pool` / :meth:`close` shut them down.

    ``kinds`` maps a name to ``"thread"`` (``WorkerThreadPool``) or ``"process"``
    (``WorkerProcessPool``). Make this before any server or client exists: the process
    pools fork, and their children would otherwise inherit those sockets.

    batchup's pools have no close API and are never shut down; here the internal
    ``ThreadPool`` / joblib ``MemmappingPool`` is terminated and joined (which also removes
    joblib's temporary folder), the process pool's ``SyncManager`` shut down, and, in
    :meth:`close`, joblib's resource-tracker process stopped.
    """

    def __init__(self, kinds: dict[str, str], processes: int = 2):
        from batchup import work_pool

        self.pools: dict[str, Any] = {}
        self.construct_s: dict[str, float] = {}
        self.kinds = dict(kinds)
        #: the data sources handed to each pool: a process pool keys its shared constants by
        #: ``id(ds)``, so a source must outlive its pool or a new one could take its id
        self._keep: dict[str, list[Any]] = {}
        try:
            for name, kind in kinds.items():
                make = {"thread": work_pool.WorkerThreadPool, "process": work_pool.WorkerProcessPool}[kind]
                t0 = time.perf_counter()
                self.pools[name] = make(processes=processes)
                self.construct_s[name] = time.perf_counter() - t0
                self._keep[name] = []
        except BaseException:
            self.close()
            raise

    def parallel(self, name: str, ds: Any, batch_buffer_size: int) -> Any:
        self._keep[name].append(ds)
        return self.pools[name].parallel_data_source(ds, batch_buffer_size=batch_buffer_size)

    def close_pool(self, name: str) -> None:
        with shielded():
            pool = self.pools.pop(name, None)
            if pool is not None:
                close_batchup_pool(pool)
            self._keep.pop(name, None)

    def close(self) -> None:
        with shielded():
            for name in list(self.pools):
                self.close_pool(name)
            if "process" in self.kinds.values():
                _stop_joblib_resource_tracker()


def close_batchup_pool(pool: Any) -> None:
    """Terminate a batchup worker pool's internal pool (and manager): batchup offers no call for it."""
    for attr in ("_WorkerThreadPool__pool", "_WorkerProcessPool__pool"):
        inner = getattr(pool, attr, None)
        if inner is not None:
            inner.terminate()  # joblib's MemmappingPool.terminate also deletes its temporary folder
            inner.join()
    manager = getattr(pool, "_WorkerProcessPool__manager", None)
    if manager is not None:
        manager.shutdown()


def _stop_joblib_resource_tracker() -> None:
    """joblib's MemmappingPool starts loky's resource tracker, which would live until we exit."""
    try:
        from joblib.externals.loky.backend import resource_tracker
    except ImportError:
        return
    tracker = resource_tracker._resource_tracker
    if getattr(tracker, "_pid", None) is not None:
        tracker._stop()


def first_epoch(source: Any, batch_size: int) -> dict[str, float]:
    """Time a source's first shuffled epoch: ``batch_iterator()`` to first batch, and the whole epoch."""
    t0 = time.perf_counter()
    it = iter(source.batch_iterator(batch_size, shuffle=np.random.RandomState(SEED)))
    next(it)
    first = time.perf_counter() - t0
    for _ in it:
        pass
    return {"first_batch_s": first, "epoch_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------- PyTorch DataLoader
@functools.cache
def _torch_types() -> tuple[Any, Any]:
    """(BatchDataset, ShuffledBatches), defined on first use so that torch loads lazily."""
    import torch
    from torch.utils.data import Dataset, Sampler

    class BatchDataset(Dataset):  # type: ignore[type-arg]
        """Whole-batch fetching: ``__getitem__`` takes an index array (one numpy gather), then
        applies ``fn(X, y)`` if given (in the worker processes when there are any)."""

        def __init__(self, X: np.ndarray, y: np.ndarray, fn: Callable[..., Any] | None = None):
            self.X, self.y, self.fn = X, y, fn

        def __len__(self) -> int:
            return len(self.X)

        def __getitem__(self, idx: np.ndarray) -> tuple[Any, Any]:
            xb, yb = self.X[idx], self.y[idx]
            if self.fn is not None:
                xb, yb = self.fn(xb, yb)
            return torch.from_numpy(xb), torch.from_numpy(yb)

    class ShuffledBatches(Sampler):  # type: ignore[type-arg]
        """batchup's shuffled StandardSampler: a RandomState permutation cut into batches."""

        def __init__(self, n: int, batch_size: int):
            self.n, self.batch_size = n, batch_size
            self.rng = np.random.RandomState(SEED)

        def __len__(self) -> int:
            return math.ceil(self.n / self.batch_size)

        def __iter__(self) -> Any:
            order = self.rng.permutation(self.n)
            for i in range(0, self.n, self.batch_size):
                yield order[i : i + self.batch_size]

    return BatchDataset, ShuffledBatches


# persistent, forked workers (they see the arrays without a copy); a hung worker raises
# after `timeout` instead of stalling the run
TORCH_WORKER_ARGS: dict[str, Any] = {
    "persistent_workers": True,
    "multiprocessing_context": "fork",
    "timeout": 120,
}


def _stop_new_children(before: set[int]) -> None:
    """Terminate the multiprocessing children started since ``before`` (a DataLoader's workers),
    leaving older ones (batchup's pools) alone."""
    for proc in multiprocessing.active_children():
        if proc.pid not in before:
            proc.terminate()
            proc.join(5)


class TorchLoaders:
    """The four DataLoader set-ups of one cell; :meth:`close` shuts their workers down."""

    def __init__(self, X: np.ndarray, y: np.ndarray, batch_size: int):
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        BatchDataset, ShuffledBatches = _torch_types()
        self._before = {p.pid for p in multiprocessing.active_children() if p.pid is not None}
        self.loaders: dict[str, tuple[Any, Any]] = {}
        #: first epoch's ``iter()`` → first batch, per system (includes forking workers)
        self.first_batch: dict[str, float] = {}
        for system in TORCH_SYSTEMS:
            workers = 2 if system.endswith("2 workers") else 0
            extra: dict[str, Any] = TORCH_WORKER_ARGS if workers else {}
            if "per-sample" in system:
                ds = TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
                loader = DataLoader(
                    ds,
                    batch_size=batch_size,
                    shuffle=True,
                    num_workers=workers,
                    generator=torch.Generator().manual_seed(SEED),
                    **extra,
                )
                self.loaders[system] = (loader, None)
            else:
                sampler = ShuffledBatches(len(X), batch_size)
                loader = DataLoader(
                    BatchDataset(X, y), batch_size=None, sampler=sampler, num_workers=workers, **extra
                )
                self.loaders[system] = (loader, sampler)

    def epochs(self) -> list[tuple[str, EpochFn]]:
        return [(system, self._epoch(system)) for system in TORCH_SYSTEMS]

    def _epoch(self, system: str) -> EpochFn:
        def epoch(rng: np.random.RandomState) -> tuple[int, int]:
            loader, sampler = self.loaders[system]
            if sampler is not None:
                sampler.rng = rng
            samples = n = 0
            t0 = time.perf_counter()
            for xb, _yb in loader:
                if system not in self.first_batch:
                    self.first_batch[system] = time.perf_counter() - t0
                samples += len(xb)
                n += 1
            return samples, n

        return epoch

    def close(self) -> None:
        """Drop the loaders: their persistent workers shut down with their iterators."""
        self.loaders.clear()
        gc.collect()
        _stop_new_children(self._before)  # be sure


class TorchBatchLoader:
    """One whole-batch DataLoader whose dataset applies ``fn`` (in its workers)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, batch_size: int, workers: int, fn: Callable[..., Any]):
        from torch.utils.data import DataLoader

        BatchDataset, ShuffledBatches = _torch_types()
        self._before = {p.pid for p in multiprocessing.active_children() if p.pid is not None}
        self.sampler = ShuffledBatches(len(X), batch_size)
        extra: dict[str, Any] = TORCH_WORKER_ARGS if workers else {}
        self.loader: Any = DataLoader(
            BatchDataset(X, y, fn), batch_size=None, sampler=self.sampler, num_workers=workers, **extra
        )

    def batches(self, rng: np.random.RandomState) -> Any:
        self.sampler.rng = rng
        return iter(self.loader)

    def epoch(self, rng: np.random.RandomState) -> tuple[int, int]:
        return _count(self.batches(rng))

    def close(self) -> None:
        self.loader = None
        gc.collect()
        _stop_new_children(self._before)


# ---------------------------------------------------------------------- raw pyzmq
class RawPeer:
    """PUSH in ``senders`` child processes (``_raw_push.py``), one PULL here; same X and y
    frame sizes. Several senders share each epoch's batches (every N-th each), as the
    service's workers do."""

    def __init__(self, children: Children, scheme: str, folder: str, senders: int = 1):
        self.ctx = zmq.Context()
        self.procs: list[subprocess.Popen[Any]] = []
        self.commands: list[zmq.Socket[Any]] = []
        try:
            self.data = self.ctx.socket(zmq.PULL)
            self.data.setsockopt(zmq.LINGER, 0)
            self.data.setsockopt(zmq.RCVHWM, 32)
            self.data.setsockopt(zmq.RCVTIMEO, 60_000)
            if scheme == "tcp":
                data_ep = f"tcp://127.0.0.1:{self.data.bind_to_random_port('tcp://127.0.0.1')}"
            else:
                data_ep = f"ipc://{folder}/raw-data-{senders}"
                self.data.bind(data_ep)
            for k in range(senders):
                sock = self.ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                self.commands.append(sock)
                if scheme == "tcp":
                    cmd_ep = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
                else:
                    cmd_ep = f"ipc://{folder}/raw-cmd-{senders}-{k}"
                    sock.bind(cmd_ep)
                self.procs.append(
                    children.popen(
                        [
                            sys.executable,
                            os.path.join(BENCH_DIR, "_raw_push.py"),
                            cmd_ep,
                            data_ep,
                            str(os.getpid()),
                        ],
                        stdin=subprocess.DEVNULL,
                    )
                )
                sock.send(json.dumps({"op": "hello"}).encode())
                try:
                    self.data.recv_multipart()
                except zmq.Again:
                    raise RuntimeError("a raw PUSH process did not connect within 60 s") from None
        except BaseException:
            self.close()
            raise

    def epoch_fn(self, w: Workload, batch_size: int, gather: tuple[str, str] | None = None) -> EpochFn:
        """One epoch of the workload's bytes; with ``gather`` (the X and y ``.npy`` files)
        the peer gathers every batch of a shuffled epoch from them first."""
        cmd: dict[str, Any] = {
            "op": "send",
            "rows": w.rows,
            "batch": batch_size,
            "x_row": w.x_row_bytes,
            "y_row": 4,
        }
        n_batches = math.ceil(w.rows / batch_size)

        def epoch(rng: np.random.RandomState) -> tuple[int, int]:
            if gather is not None:
                cmd["gather"] = {"x": gather[0], "y": gather[1], "seed": int(rng.randint(2**31))}
            for k, sock in enumerate(self.commands):
                sock.send(json.dumps({**cmd, "part": [k, len(self.commands)]}).encode())
            samples = 0
            for _ in range(n_batches):
                frames = self.data.recv_multipart(copy=False)
                X = np.frombuffer(frames[0].buffer, dtype=np.float32).reshape(-1, *w.shape)
                np.frombuffer(frames[1].buffer, dtype=np.int32)
                samples += len(X)
            return samples, n_batches

        return epoch

    def close(self) -> None:
        with shielded():
            for sock in self.commands:
                try:
                    sock.send(json.dumps({"op": "stop"}).encode(), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            for proc in self.procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
                Children.stop(proc)
            self.ctx.destroy(linger=0)


# ---------------------------------------------------------------------- the service
def connect_latency(settings: Settings, endpoint: str, source: str, batch_size: int) -> dict[str, Any]:
    """connect() → source() → first batch of a shuffled epoch, on a warm named source."""
    import batchup_client

    rows: list[tuple[float, float, float]] = []
    for r in range(settings.latency_repeats):
        t0 = time.perf_counter()
        client = batchup_client.connect(endpoint)
        try:
            t1 = time.perf_counter()
            src = client.source(source)
            t2 = time.perf_counter()
            it = src.batch_iterator(batch_size, shuffle=np.random.RandomState(SEED + r))
            next(it)
            t3 = time.perf_counter()
            it.close()  # type: ignore[attr-defined]
        finally:
            with shielded():
                client.close()
        rows.append((t1 - t0, t2 - t1, t3 - t2))
    totals = [sum(r) for r in rows]
    return {
        "total_median": statistics.median(totals),
        "total_min": min(totals),
        "connect": statistics.median(r[0] for r in rows),
        "source": statistics.median(r[1] for r in rows),
        "first_batch": statistics.median(r[2] for r in rows),
        "repeats": len(rows),
        "source_name": source,
        "batch": batch_size,
    }


def embedded_start(settings: Settings) -> dict[str, Any]:
    """``batchup_client.connect()`` with no address: starting a private server until it returns."""
    import batchup_client

    starts, closes = [], []
    for _ in range(settings.embedded_repeats):
        client = None
        try:
            t0 = time.perf_counter()
            client = batchup_client.connect()
            t1 = time.perf_counter()
        finally:
            if client is not None:
                with shielded():
                    client.close()
        t2 = time.perf_counter()
        starts.append(t1 - t0)
        closes.append(t2 - t1)
    return {
        "start_median": statistics.median(starts),
        "start_min": min(starts),
        "close_median": statistics.median(closes),
        "repeats": len(starts),
    }


# ---------------------------------------------------------------------- concurrency
class ClientProcesses:
    """Client processes (``_client_proc.py``), one per endpoint, released together.

    The concurrency section runs several on one server (:meth:`go`). The fan-in section
    runs one per pinned server as a system (:meth:`epoch`): two servers each feeding its
    own trainer is what fan-in could reach at best on this machine, with the same servers
    and cores, the same work per batch on the trainers' side, and nothing merged.
    ``close_ahead`` (as a client's, for :class:`Settle`) closes the streams they opened
    ahead for a next epoch."""

    def __init__(
        self,
        children: Children,
        endpoints: list[str],
        workload: Workload,
        batch_size: int,
        flags: tuple[str, ...] = (),
        epochs: int = 1,
        seed_step: int = 7000,
    ):
        script = os.path.join(BENCH_DIR, "_client_proc.py")
        self.closed = False
        self.procs: list[subprocess.Popen[str]] = []
        try:
            for i, endpoint in enumerate(endpoints):
                self.procs.append(
                    children.popen(
                        [
                            sys.executable,
                            script,
                            endpoint,
                            workload.name,
                            str(batch_size),
                            str(epochs),
                            str(SEED + seed_step * (i + 1)),
                            *flags,
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            self._expect("ready", 120.0)
        except BaseException:
            self.close()
            raise

    def _say(self, line: str) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(line + "\n")
            p.stdin.flush()

    def _expect(self, word: str, timeout: float) -> None:
        for i, p in enumerate(self.procs):
            line = read_line(p, timeout, f"client process {i}")
            if line != word:
                raise RuntimeError(f"client process {i} said {line!r} instead of {word}")

    def go(self) -> list[dict[str, Any]]:
        """One run of each: its ``{"samples", "batches", "t0", "t1"}``."""
        self._say("go")
        return [json.loads(read_line(p, 600.0, f"client process {i}")) for i, p in enumerate(self.procs)]

    def epoch(self, rng: np.random.RandomState) -> tuple[int, int]:
        """One run of each (each draws from its own RandomState, seeded apart)."""
        rows = self.go()
        return sum(r["samples"] for r in rows), sum(r["batches"] for r in rows)

    def close_ahead(self) -> None:
        self._say("settle")
        self._expect("settled", 60.0)

    def close(self) -> None:
        """EOF to each (its client closes its connection and it exits), then stop any left."""
        self.closed = True
        with shielded():
            for p in self.procs:
                if p.stdin is not None and not p.stdin.closed:
                    p.stdin.close()
            for p in self.procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    pass
                Children.stop(p)


def concurrency(
    settings: Settings,
    children: Children,
    endpoint: str,
    workload: Workload,
    batch_size: int,
    counts: tuple[int, ...],
    log: Log,
) -> list[dict[str, Any]]:
    """N client processes on one server, released together; aggregate samples/s."""
    out = []
    for n in counts:
        procs = ClientProcesses(
            children, [endpoint] * n, workload, batch_size, epochs=settings.concurrency_epochs, seed_step=1000
        )
        try:
            aggregates, per_client = [], []
            for _ in range(settings.concurrency_runs):
                rows = procs.go()
                span = max(r["t1"] for r in rows) - min(r["t0"] for r in rows)
                aggregates.append(sum(r["samples"] for r in rows) / span)
                per_client += [r["samples"] / (r["t1"] - r["t0"]) for r in rows]
        finally:
            procs.close()
        row = {
            "clients": n,
            "aggregate": statistics.median(aggregates),
            "aggregates": aggregates,
            "per_client": statistics.median(per_client),
        }
        log(
            f"  {n} client(s): aggregate {row['aggregate']:,.0f} samples/s "
            f"(per client {row['per_client']:,.0f})"
        )
        out.append(row)
    return out
