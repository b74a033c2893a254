"""Where the CPU goes per delivered batch: the service's processes and threads, one stream.

    python3 bench/cpu_profile.py                          # CIFAR-shaped, batch 256, shm, 2 workers
    python3 bench/cpu_profile.py --transport tcp          # batches over the tcp socket
    python3 bench/cpu_profile.py --augment --workers 1    # .map(augment) in one server worker
    python3 bench/cpu_profile.py --workload mnist --batch-size 64   # small batches
    python3 bench/cpu_profile.py --quick                  # small arrays, a smoke run

Starts one ``batchup-server`` (tcp on loopback) on a generated CIFAR- or MNIST-shaped
``.npy`` source, streams a warm-up epoch and then ``--epochs`` shuffled epochs, and reads every thread's CPU
time (``/proc/PID/task/TID/stat``) before and after: the router, each worker (its main
thread and ZeroMQ's I/O thread), and this client. It prints CPU milliseconds per delivered
batch for each, their sum, the machine's idle share, and the rate that sum allows on this
machine's cores if nothing else ran (``cores / CPU per batch``) — the ceiling the
throughput targets in ``bench/RESULTS.md`` run into. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

import batchup_client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _augment import augment
from _common import (
    Children,
    Workload,
    live_children,
    make_data,
    start_server,
    stop_server,
    write_server_config,
)

TICK = os.sysconf("SC_CLK_TCK")
SHAPES = {"cifar": (50000, (3, 32, 32)), "mnist": (60000, (1, 28, 28))}  #: float32 rows, as in bench/run.py


def thread_times(pids: list[int]) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, tid) -> (thread name, user + system CPU seconds) for every thread of ``pids``."""
    out: dict[tuple[int, int], tuple[str, float]] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    text = f.read()
            except FileNotFoundError:
                continue
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            out[(pid, int(tid))] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def idle_and_total() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4], sum(values)


def role(pid: int, server: int, workers: list[int]) -> str:
    if pid == os.getpid():
        return "client"
    return "server router" if pid == server else f"server worker {workers.index(pid)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[-1].strip(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transport", choices=["shm", "tcp"], default="shm", help="batch path (default shm)")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    parser.add_argument("--augment", action="store_true", help="stream .map(augment) (bench/_augment.py)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    parser.add_argument(
        "--workload",
        choices=sorted(SHAPES),
        default="cifar",
        help="source shape (default cifar: 50,000×3×32×32)",
    )
    parser.add_argument(
        "--epochs", type=int, default=0, help="timed epochs (default 10, or 3 with --augment)"
    )
    parser.add_argument("--quick", action="store_true", help="5,000 rows instead of 50,000 (a smoke run)")
    args = parser.parse_args(argv)
    epochs = args.epochs or (3 if args.augment else 10)
    rows, shape = SHAPES[args.workload]
    work = Workload(args.workload, rows // 10 if args.quick else rows, shape)
    folder = tempfile.mkdtemp(prefix="bu-cpu-")
    children = Children()
    try:
        config = write_server_config(folder, make_data(folder, (work,)))
        server = start_server(children, "tcp://127.0.0.1:0", config, args.workers, folder)
        try:
            with batchup_client.connect(server.endpoint) as client:
                client.shared_memory_batches = args.transport == "shm"
                source: Any = client.source(work.name)
                if args.augment:
                    source = source.map(augment)
                rng = np.random.RandomState(0)
                for _ in source.batch_iterator(args.batch_size, shuffle=rng):  # warm-up epoch
                    pass
                # the workers (multiprocessing spawn children), not their resource tracker
                workers = sorted(p for p, cmd in live_children(server.proc.pid) if "spawn_main" in cmd)
                pids = [server.proc.pid, *workers, os.getpid()]
                before, idle0 = thread_times(pids), idle_and_total()
                t0, batches = time.perf_counter(), 0
                for _ in range(epochs):
                    for _ in source.batch_iterator(args.batch_size, shuffle=rng):
                        batches += 1
                wall = time.perf_counter() - t0
                after, idle1 = thread_times(pids), idle_and_total()
                transport = client.info()["batch_transport"]
        finally:
            stop_server(server)
        report(args, work, epochs, batches, wall, before, after, idle0, idle1, pids, workers, transport)
    finally:
        children.close()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def report(
    args: argparse.Namespace,
    work: Workload,
    epochs: int,
    batches: int,
    wall: float,
    before: dict[tuple[int, int], tuple[str, float]],
    after: dict[tuple[int, int], tuple[str, float]],
    idle0: tuple[int, int],
    idle1: tuple[int, int],
    pids: list[int],
    workers: list[int],
    transport: str,
) -> None:
    cores = len(os.sched_getaffinity(0))
    rate = batches / wall
    print(
        f"{work.rows:,}×{'×'.join(map(str, work.shape))} float32, batch {args.batch_size}, {'.map(augment), ' if args.augment else ''}"
        f"{args.workers} worker(s), batches via {transport}: {epochs} epochs, {batches} batches in "
        f"{wall:.2f} s = {rate:,.0f} batches/s"
    )
    print()
    print("| process | thread | CPU ms per batch |")
    print("|---|---|---:|")
    total = 0.0
    for key in sorted(after, key=lambda k: (pids.index(k[0]), k[1])):
        name, cpu = after[key]
        used = cpu - before.get(key, (name, 0.0))[1]
        if used <= 0:
            continue
        per_batch = 1e3 * used / batches
        total += per_batch
        print(f"| {role(key[0], pids[0], workers)} | {name} ({key[1]}) | {per_batch:.3f} |")
    idle_share = (idle1[0] - idle0[0]) / max(1, idle1[1] - idle0[1])
    print(f"| **all** | | **{total:.3f}** |")
    print()
    ceiling = cores / (total / 1e3) if total > 0 else float("inf")
    print(
        f"machine idle {100 * idle_share:.0f}% of {cores} core(s); the CPU per batch above allows at most "
        f"{ceiling:,.0f} batches/s on {cores} core(s) (measured {rate:,.0f})"
    )


if __name__ == "__main__":
    sys.exit(main())
