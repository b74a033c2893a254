"""Shared plumbing of the benchmark suite: settings, timing, data, child processes.

Every child process the suite starts goes through :class:`Children`, whose ``close()``
(called from ``run.py``'s ``finally``) terminates whatever is still running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import json
import math
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = [
    "BENCH_DIR",
    "Children",
    "LoadMonitor",
    "Settle",
    "Result",
    "Settings",
    "StepResult",
    "Workload",
    "install_signal_handlers",
    "leftover_folders",
    "live_children",
    "make_data",
    "measure_cell",
    "measure_training_step",
    "read_line",
    "shielded",
    "start_server",
    "stop_server",
]

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
SEED = 12345


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str  #: "mnist" or "cifar" (also the server's source name)
    rows: int
    shape: tuple[int, ...]  #: shape of one sample of X

    @property
    def x_row_bytes(self) -> int:
        return 4 * math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        return self.x_row_bytes + 4  # float32 X row + one int32 label

    @property
    def label(self) -> str:
        shape = "×".join(str(s) for s in self.shape)
        return f"{self.name.upper()}-shaped ({self.rows}×{shape} f4 + i4)"


@dataclasses.dataclass(frozen=True)
class Settings:
    quick: bool
    runs: int  #: timed runs per cell (medians are over these)
    batch_sizes: tuple[int, ...]
    workloads: tuple[Workload, ...]
    min_run_seconds: float  #: a run repeats epochs until it lasts about this long
    warmup_seconds: float  #: warm-up epochs per system and cell: at least 2, for this long
    max_epochs_per_run: int
    latency_repeats: int  #: connect→first batch repeats
    embedded_repeats: int
    concurrency_runs: int
    concurrency_epochs: int  #: epochs per client per concurrency run
    aug_runs: int  #: timed runs per system in the augmentation section
    #: a run of the augmentation and fan-in sections lasts at least about this long: their
    #: epochs take ~1 s, and one-epoch runs swung ±15% from round to round
    aug_min_run_seconds: float
    step_runs: int  #: timed epochs per system in the training-step section
    step_seconds: float = 0.004  #: the emulated training step (a sleep after every batch)
    step_warmup: int = 5  #: batches of each training-step epoch that are not timed
    pool_buffer: int = 20  #: batchup's ``batch_buffer_size`` (its default) for the worker pools

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                quick=True,
                runs=1,
                batch_sizes=(256,),
                workloads=(Workload("mnist", 6000, (1, 28, 28)), Workload("cifar", 5000, (3, 32, 32))),
                min_run_seconds=0.0,
                warmup_seconds=0.0,
                max_epochs_per_run=1,
                latency_repeats=2,
                embedded_repeats=1,
                concurrency_runs=1,
                concurrency_epochs=1,
                aug_runs=1,
                aug_min_run_seconds=0.0,
                step_runs=1,
            )
        return cls(
            quick=False,
            runs=7,
            batch_sizes=(64, 256, 1024),
            workloads=(Workload("mnist", 60000, (1, 28, 28)), Workload("cifar", 50000, (3, 32, 32))),
            min_run_seconds=0.25,
            warmup_seconds=0.5,
            max_epochs_per_run=8,
            latency_repeats=7,
            embedded_repeats=5,
            concurrency_runs=3,
            concurrency_epochs=2,
            aug_runs=5,
            aug_min_run_seconds=2.0,
            step_runs=5,
        )


@dataclasses.dataclass
class Result:
    """The timed runs of one system on one workload and batch size."""

    system: str
    workload: str
    batch_size: int
    samples_per_s: list[float]
    batches_per_s: list[float]
    bytes_per_s: list[float]
    epochs_per_run: int
    note: str = ""

    @property
    def samples(self) -> float:
        return statistics.median(self.samples_per_s)

    @property
    def batches(self) -> float:
        return statistics.median(self.batches_per_s)

    @property
    def gbytes(self) -> float:
        return statistics.median(self.bytes_per_s) / 1e9


EpochFn = Callable[[np.random.RandomState], tuple[int, int]]
#: ``batches(rng)``: an iterator over one shuffled epoch of batches
BatchesFn = Callable[[np.random.RandomState], Iterator[Any]]


def measure_cell(
    settings: Settings,
    workload: Workload,
    batch_size: int,
    systems: list[tuple[str, EpochFn]],
    log: Callable[[str], None] = print,
    after_run: Callable[[], None] | None = None,
) -> list[Result]:
    """Time every system on one workload and batch size, interleaved.

    ``epoch(rng)`` iterates one epoch shuffled with ``rng`` and returns (samples, batches).
    Each system first runs warm-up epochs, at least two and for at least
    ``warmup_seconds``; the last sets how many epochs make a run last about
    ``min_run_seconds``. The first epochs pay one-off costs (a new shared-memory pool's
    pages, allocated, then mapped by each worker as it first uses each slot), which made
    the runs of the fastest systems too short and their first runs slow. The warm-up
    epochs draw from one ``RandomState``: the same state for each made every stream opened
    ahead go unused, and after two the client opens none for those arguments. Then come
    ``settings.runs`` rounds; in each round every system does one timed run, in an order
    rotated from round to round, so background load and drift hit all systems alike. A
    run's epochs share one fresh ``RandomState`` and draw successive permutations from it,
    as a training loop would. ``after_run`` runs
    after every run, untimed (see :class:`Settle`).
    """
    epochs: dict[str, int] = {}
    for name, epoch in systems:
        start = time.perf_counter()
        rng = np.random.RandomState(SEED)  # one, as a training loop (and a timed run) has
        for i in itertools.count():
            t0 = time.perf_counter()
            epoch(rng)
            warm = time.perf_counter() - t0
            if i >= 1 and t0 + warm - start >= settings.warmup_seconds:
                break
        if after_run is not None:
            after_run()
        k = 1
        if settings.min_run_seconds > 0 and warm > 0:
            k = max(1, min(settings.max_epochs_per_run, math.ceil(settings.min_run_seconds / warm)))
        epochs[name] = k
    runs: dict[str, list[tuple[float, int, int]]] = {name: [] for name, _ in systems}
    for rnd in range(settings.runs):
        shift = rnd % len(systems)
        for name, epoch in systems[shift:] + systems[:shift]:
            rng = np.random.RandomState(SEED + 1 + rnd)
            samples = batches = 0
            t0 = time.perf_counter()
            for _ in range(epochs[name]):
                s, b = epoch(rng)
                samples += s
                batches += b
            runs[name].append((time.perf_counter() - t0, samples, batches))
            if after_run is not None:
                after_run()
    results = []
    for name, _ in systems:
        r = Result(
            name,
            workload.name,
            batch_size,
            [s / dt for dt, s, _ in runs[name]],
            [b / dt for dt, _, b in runs[name]],
            [s * workload.row_bytes / dt for dt, s, _ in runs[name]],
            epochs[name],
        )
        log(
            f"  {name:<34} {workload.name:<5} bs={batch_size:<5} "
            f"{r.samples:>12,.0f} samples/s {r.batches:>9,.0f} batches/s ({epochs[name]} epoch/run)"
        )
        results.append(r)
    return results


@dataclasses.dataclass
class StepResult:
    """One system feeding an emulated training loop: wait share and batches/s per timed epoch."""

    system: str
    wait_fractions: list[float]  #: share of the timed wall time spent inside ``next()``
    batches_per_s: list[float]
    batches: int  #: batches timed per epoch (after the warm-up batches)
    note: str = ""

    @property
    def wait(self) -> float:
        return statistics.median(self.wait_fractions)

    @property
    def batches_rate(self) -> float:
        return statistics.median(self.batches_per_s)


def _training_epoch(
    batches: BatchesFn, rng: np.random.RandomState, step: float, warmup: int
) -> tuple[float, float, int]:
    """One epoch with ``time.sleep(step)`` after every batch; (waiting s, wall s, batches) after
    the first ``warmup`` batches. The window ends when the last batch's step is done."""
    it = batches(rng)
    waited = 0.0
    n = 0
    t_window = t_end = time.perf_counter() if warmup == 0 else None
    try:
        while True:
            t0 = time.perf_counter()
            try:
                next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            n += 1
            if t_window is not None:
                waited += t1 - t0
            time.sleep(step)
            if n == warmup:
                t_window = time.perf_counter()
            t_end = time.perf_counter()
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    if t_window is None or t_end is None:
        raise RuntimeError(f"an epoch of {n} batches is too short for {warmup} warm-up batches")
    return waited, t_end - t_window, n - warmup


def measure_training_step(
    settings: Settings,
    systems: list[tuple[str, BatchesFn]],
    log: Callable[[str], None] = print,
    after_run: Callable[[], None] | None = None,
) -> list[StepResult]:
    """Feed an emulated training step (a fixed sleep per batch) from every system, interleaved.

    Each system first iterates one untimed epoch without sleeping (worker start-up, caches);
    then come ``settings.step_runs`` rounds in a rotated order, each one epoch per system.
    """
    for _name, batches in systems:
        _training_epoch(batches, np.random.RandomState(SEED), 0.0, 0)
        if after_run is not None:
            after_run()
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _ in systems}
    for rnd in range(settings.step_runs):
        shift = rnd % len(systems)
        for name, batches in systems[shift:] + systems[:shift]:
            rng = np.random.RandomState(SEED + 1 + rnd)
            runs[name].append(_training_epoch(batches, rng, settings.step_seconds, settings.step_warmup))
            if after_run is not None:
                after_run()
    out = []
    for name, _ in systems:
        r = StepResult(
            name,
            [waited / wall for waited, wall, _ in runs[name]],
            [n / wall for _, wall, n in runs[name]],
            runs[name][0][2],
        )
        log(f"  {name:<48} waits {r.wait:6.1%} of the time, {r.batches_rate:,.0f} batches/s")
        out.append(r)
    return out


# ---------------------------------------------------------------------- signals
_shield_depth = 0
_pending_signal: int | None = None


def _on_signal(signum: int, _frame: Any) -> None:
    global _pending_signal
    if _shield_depth:
        _pending_signal = signum  # raised when the cleanup in progress is done
        return
    _raise_for(signum)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT raise (SystemExit / KeyboardInterrupt), so every ``finally`` runs."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Defer SIGTERM/SIGINT until the block is done: for cleanup (closing clients, stopping
    servers) that must not be cut in half, e.g. ``LocalServer.stop`` between terminating the
    embedded server and removing its folder."""
    global _shield_depth, _pending_signal
    _shield_depth += 1
    try:
        yield
    finally:
        _shield_depth -= 1
        if _shield_depth == 0 and _pending_signal is not None:
            signum, _pending_signal = _pending_signal, None
            _raise_for(signum)


# ---------------------------------------------------------------------- data
def make_data(folder: str, workloads: tuple[Workload, ...]) -> dict[str, tuple[str, str]]:
    """Random X (float32) and y (int32) per workload as .npy files, from RandomState(0)."""
    rs = np.random.RandomState(0)
    paths: dict[str, tuple[str, str]] = {}
    chunk = 5000
    for w in workloads:
        xp = os.path.join(folder, f"{w.name}_X.npy")
        yp = os.path.join(folder, f"{w.name}_y.npy")
        X = np.lib.format.open_memmap(xp, mode="w+", dtype=np.float32, shape=(w.rows, *w.shape))
        for start in range(0, w.rows, chunk):
            stop = min(w.rows, start + chunk)
            X[start:stop] = rs.random_sample((stop - start, *w.shape))
        X.flush()
        del X
        np.save(yp, rs.randint(0, 10, size=w.rows).astype(np.int32))
        paths[w.name] = (xp, yp)
    return paths


def write_server_config(folder: str, paths: dict[str, tuple[str, str]]) -> str:
    lines = []
    for name, (xp, yp) in paths.items():
        lines.append(f"[sources.{name}]")
        lines.append(f"npy = {{ X = {json.dumps(xp)}, y = {json.dumps(yp)} }}")
    path = os.path.join(folder, "server.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------- processes
class Children:
    """Every subprocess the suite starts; :meth:`close` stops those still running."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(cmd, **kwargs)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass
        return int(proc.returncode)

    def close(self) -> None:
        with shielded():
            for proc in reversed(self.procs):
                self.stop(proc)
            self.procs.clear()


def read_line(proc: subprocess.Popen[Any], timeout: float, what: str) -> str:
    """One line of a child's (text) stdout, or an error naming ``what`` after ``timeout``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"{what}: no output within {timeout:g}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what}: exited with code {proc.wait(5)} before answering")
    return line.strip()


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen[Any]
    endpoint: str
    log_path: str


def start_server(
    children: Children, bind: str, config: str, workers: int, log_dir: str, cpus: str = ""
) -> Server:
    """``python -m batchup_server`` on ``bind`` (pinned to ``cpus`` with taskset, if given);
    returns once it printed its ready line."""
    log_path = os.path.join(log_dir, f"server-{len(children.procs)}.log")
    cmd = (["taskset", "-c", cpus] if cpus else []) + [
        sys.executable,
        "-m",
        "batchup_server",
        "--bind",
        bind,
        "--config",
        config,
        "--workers",
        str(workers),
        "--no-demo",
        "--trust-client-code",  # the benchmark ships its own augmentation to the workers
        "--log-level",
        "warning",
        "--parent-pid",
        str(os.getpid()),  # it exits if this benchmark dies
    ]
    with open(log_path, "w") as logf:
        proc = children.popen(cmd, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL, text=True)
    try:
        line = read_line(proc, 60.0, "batchup-server")
    except RuntimeError as exc:
        Children.stop(proc)
        with open(log_path) as f:
            raise RuntimeError(f"{exc}\n{f.read()[-2000:]}") from None
    if not line.startswith("batchup-server ready on "):
        raise RuntimeError(f"unexpected first line from batchup-server: {line!r}")
    return Server(proc, line.rsplit(" ", 1)[1], log_path)


def stop_server(server: Server) -> int:
    """Stop a server and remove folders it may have left if it had to be killed."""
    with shielded():
        code = Children.stop(server.proc)
        for root in ("/dev/shm", tempfile.gettempdir()):
            for path in glob.glob(os.path.join(root, f"batchup-{server.proc.pid}-*")):
                shutil.rmtree(path, ignore_errors=True)
    return code


# ---------------------------------------------------------------------- leftovers
def leftover_folders() -> set[str]:
    """batchup-* folders in /dev/shm and the temp folder (and /tmp), and the temporary folders
    of this process's joblib pools (batchup's WorkerProcessPool)."""
    found: set[str] = set()
    for root in {"/dev/shm", tempfile.gettempdir(), "/tmp"}:
        found.update(glob.glob(os.path.join(root, "batchup-*")))
        found.update(glob.glob(os.path.join(root, f"joblib_memmapping_folder_{os.getpid()}_*")))
    return found


def live_children(pid: int | None = None) -> list[tuple[int, str]]:
    """(pid, command line) of the live, non-zombie child processes of ``pid`` (default: this one)."""
    parent = os.getpid() if pid is None else pid
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            if int(rest[1]) != parent or rest[0] == "Z":
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue
        found.append((int(name), cmd))
    return found


def owner_gone(path: str) -> bool:
    """True unless the folder's name carries the pid of a live process (another server's)."""
    pids = [p for p in os.path.basename(path).split("-") if p.isdigit()]
    return not pids or not os.path.exists(f"/proc/{pids[0]}")


# ---------------------------------------------------------------------- background load
def _tree_cpu_seconds(root: int) -> float:
    """CPU time of ``root`` and all its live descendants, including reaped children's."""
    procs: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        procs[int(name)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += procs.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


class Settle:
    """Between two timed runs: the service's clients close the streams they opened ahead
    for a next epoch no run will read (a training loop's last epoch leaves one, which would
    go on making batches on the CPU of the next system's run), and the servers' process
    trees are waited for until they use no CPU for a while (at most ``limit`` seconds)."""

    def __init__(self, quiet: float = 0.03, limit: float = 1.0):
        self.clients: list[Any] = []  #: every service client the benchmark made
        self.quiet = quiet
        self.limit = limit

    def add(self, client: Any) -> Any:
        self.clients.append(client)
        return client

    def __call__(self) -> None:
        for client in self.clients:
            close = getattr(client, "close_ahead", None)
            if close is not None and not client.closed:
                close()
        servers = [pid for pid, cmd in live_children() if "batchup_server" in cmd]
        deadline = time.monotonic() + self.limit
        before = sum(_tree_cpu_seconds(p) for p in servers)
        quiet = 0  # windows in a row without a clock tick (10 ms ticks: two, to be sure)
        while time.monotonic() < deadline and quiet < 2:
            time.sleep(self.quiet)  # noqa: sleep-ok (sampling the servers' CPU clocks)
            now = sum(_tree_cpu_seconds(p) for p in servers)
            quiet = quiet + 1 if now == before else 0
            before = now


def _machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


class LoadMonitor:
    """CPU time used on this machine by processes outside the benchmark's tree, per section."""

    def __init__(self) -> None:
        self.sections: list[dict[str, Any]] = []
        self._open: tuple[str, float, float, float] | None = None

    def start(self, name: str) -> None:
        self.stop()
        self._open = (name, time.monotonic(), _machine_busy_seconds(), _tree_cpu_seconds(os.getpid()))

    def stop(self) -> None:
        if self._open is None:
            return
        name, t0, busy0, own0 = self._open
        self._open = None
        wall = time.monotonic() - t0
        busy = _machine_busy_seconds() - busy0
        own = _tree_cpu_seconds(os.getpid()) - own0
        self.sections.append({"name": name, "wall": wall, "own": own, "foreign": max(0.0, busy - own)})
