"""Run every benchmark side by side and write RESULTS.md and results.png.

    python3 bench/run.py            # full run (~10 min on 2 cores)
    python3 bench/run.py --quick    # smoke run on small arrays (< 60 s)
    python3 bench/run.py --out DIR  # write RESULTS.md / results.png into DIR (default: bench/)

Systems: batchup 0.2.3 in process and with its WorkerThreadPool(2) / WorkerProcessPool(2),
PyTorch DataLoader (4 set-ups), the service over tcp and ipc, the drop-in ArrayDataSource on
the embedded server, and raw pyzmq PUSH/PULL moving the same bytes (pre-built, and gathered
from the same ``.npy`` files by one or by two sending processes: the service's socket-path
work without the service). Then an augmentation
workload (random crop + flip, ``bench/_augment.py``) through batchup, batchup's process
pool, a DataLoader with 2 workers and the service with 1 and 2 server workers, and an
emulated training step (a fixed sleep per batch) fed by those systems. Plus connect→first-
batch latency, embedded-server start time and 1 vs 4 concurrent clients. Every child
process is stopped and every temporary folder removed on every exit path.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import multiprocessing
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any

import batchup.data_source
import numpy as np

import batchup_client
import batchup_client.data_source

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _systems as S
from _augment import augment, calibrate
from _common import (
    BENCH_DIR,
    Children,
    LoadMonitor,
    Result,
    Settings,
    Settle,
    StepResult,
    Workload,
    install_signal_handlers,
    leftover_folders,
    live_children,
    make_data,
    measure_cell,
    measure_training_step,
    owner_gone,
    shielded,
    start_server,
    stop_server,
    write_server_config,
)
from _report import write_markdown, write_plot


def _close(client: Any) -> None:
    with shielded():
        client.close()


def log(msg: str) -> None:
    print(msg, flush=True)


AUG_BATCH = 256


FANIN_ONE = "service, 1 server (pinned to core 0), .map(augment), shared memory"
FANIN_TWO = "service, 2 servers (pinned to cores 0 and 1), .map(augment), shared memory"
FANIN_ONE_TCP = "service, 1 server (pinned to core 0), .map(augment), tcp socket"
FANIN_TWO_TCP = "service, 2 servers (pinned to cores 0 and 1), .map(augment), tcp socket"
FANIN_PAIR = "bound: 2 servers (pinned to cores 0 and 1), each feeding its own client process, shared memory"
FANIN_PAIR_TCP = "bound: 2 servers (pinned to cores 0 and 1), each feeding its own client process, tcp socket"


def aug_timing(settings: Settings) -> Settings:
    """The augmentation and fan-in cells' timing: ``aug_runs`` rounds of runs that last at
    least ``aug_min_run_seconds`` each."""
    return dataclasses.replace(settings, runs=settings.aug_runs, min_run_seconds=settings.aug_min_run_seconds)


def fanin_section(
    settings: Settings,
    children: Children,
    config: str,
    work: str,
    key: Workload,
    load: LoadMonitor,
    settle: Settle,
) -> list[Result]:
    """Several servers feeding one trainer: two servers, each pinned to one core with
    taskset (router and one worker), against one of them alone; the augmentation on the
    CIFAR-shaped source, batch 256, servers on tcp. Batches come through shared memory (the
    default on one host, fanned out too since protocol 1.4) and, forced, over the socket."""
    load.start("fan-in: 1 vs 2 pinned servers")
    log("fan-in: one server vs two, each pinned to one core")
    with contextlib.ExitStack() as stack:
        servers = []
        for cpu in ("0", "1"):
            server = start_server(children, "tcp://127.0.0.1:0", config, 1, work, cpus=cpu)
            stack.callback(stop_server, server)
            servers.append(server)
        systems = []
        for shm, (one_name, two_name, pair_name) in (
            (True, (FANIN_ONE, FANIN_TWO, FANIN_PAIR)),
            (False, (FANIN_ONE_TCP, FANIN_TWO_TCP, FANIN_PAIR_TCP)),
        ):
            one = settle.add(batchup_client.connect(servers[0].endpoint))
            stack.callback(_close, one)
            one.shared_memory_batches = shm
            two = settle.add(batchup_client.connect([s.endpoint for s in servers]))
            stack.callback(_close, two)
            two.shared_memory_batches = shm
            flags = ("augment",) if shm else ("augment", "socket")
            pair = settle.add(
                S.ClientProcesses(children, [s.endpoint for s in servers], key, AUG_BATCH, flags)
            )
            stack.callback(pair.close)
            systems += [
                (one_name, S.iterator_epoch(one.source(key.name).map(augment), AUG_BATCH)),
                (two_name, S.iterator_epoch(two.source(key.name).map(augment), AUG_BATCH)),
                (pair_name, pair.epoch),
            ]
        results = measure_cell(aug_timing(settings), key, AUG_BATCH, systems, log, settle)
        log("stopping the fan-in servers")
    return results


def augmentation_sections(
    settings: Settings,
    children: Children,
    config: str,
    work: str,
    key: Workload,
    arrays: tuple[np.ndarray, np.ndarray],
    dropin: Any,
    pools: S.BatchupPools,
    load: LoadMonitor,
    extras: dict[str, Any],
    settle: Settle,
) -> tuple[list[Result], list[StepResult]]:
    """Augmentation throughput and the emulated training step, on ``key`` (CIFAR-shaped), batch 256.

    Starts its own servers (1 and 2 workers, tcp, default client settings: shared memory on
    this host) and stops them on the way out.
    """
    X, y = arrays
    bs = AUG_BATCH
    load.start("augmentation: calibration, servers, where map runs, pool start")
    extras["augment"] = calibrate(key.shape, bs, repeats=7 if not settings.quick else 3)
    log(f"augment(): {extras['augment']['median_ms']:.2f} ms per batch of {bs} (median, in this process)")
    with contextlib.ExitStack() as stack:
        sources = {}
        for n in (1, 2):
            server = start_server(children, "tcp://127.0.0.1:0", config, n, work)
            stack.callback(stop_server, server)
            client = settle.add(batchup_client.connect(server.endpoint))  # default settings: shared memory
            stack.callback(_close, client)
            sources[n] = client.source(key.name)
        extras["map_where"] = {
            "service": S.where_map_ran(sources[2], bs),
            "dropin": S.where_map_ran(dropin, bs),
        }
        for k, v in extras["map_where"].items():
            log(f"  {k}: .map(fn) ran in {v['where']} (pids {v['pids']}, bench {v['bench_pid']})")
        in_process = batchup.data_source.ArrayDataSource([X, y], repeats=1).map(augment)
        pooled = pools.parallel(
            "augment",
            batchup.data_source.ArrayDataSource([X, y], repeats=1).map(augment),
            settings.pool_buffer,
        )
        first = S.first_epoch(pooled, bs)
        extras["pool_startup"].append({"system": S.AUG_POOL, "workload": key.name, "batch": bs, **first})
        log(f"  {S.AUG_POOL}: first batch after {first['first_batch_s']:.2f} s")
        loader = S.TorchBatchLoader(X, y, bs, 2, augment)
        stack.callback(loader.close)

        load.start("augmentation throughput")
        log(f"augmentation, {key.label}, batch {bs}")
        systems = [
            (S.AUG_BATCHUP, S.iterator_epoch(in_process, bs)),
            (S.AUG_POOL, S.iterator_epoch(pooled, bs)),
            (S.AUG_TORCH, loader.epoch),
            (S.AUG_SERVICE_1, S.iterator_epoch(sources[1].map(augment), bs)),
            (S.AUG_SERVICE_2, S.iterator_epoch(sources[2].map(augment), bs)),
            (S.AUG_DROPIN, S.iterator_epoch(dropin.map(augment), bs)),
        ]
        results = measure_cell(aug_timing(settings), key, bs, systems, log, settle)

        load.start("training step")
        log(f"emulated training step: {settings.step_seconds * 1e3:g} ms sleep per batch")
        steps = measure_training_step(
            settings,
            [
                (S.AUG_SERVICE_2, S.iterator_batches(sources[2].map(augment), bs)),
                (S.AUG_BATCHUP, S.iterator_batches(in_process, bs)),
                (S.AUG_POOL, S.iterator_batches(pooled, bs)),
                (S.AUG_TORCH, loader.batches),
            ],
            log,
            settle,
        )
        log("stopping the augmentation servers")
    pools.close_pool("augment")
    return results, steps


def run(settings: Settings, out_dir: str, command: str) -> int:
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t_start = time.perf_counter()
    before = leftover_folders()
    children = Children()
    work = tempfile.mkdtemp(prefix="bubench-")
    results: list[Result] = []
    extras: dict[str, Any] = {}
    load = LoadMonitor()
    extras["load"] = load.sections
    settle = Settle()  # between timed runs: no stream opened ahead works on for nobody
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(load.stop)
            load.start("data generation")
            log(f"generating data in {work}")
            paths = make_data(work, settings.workloads)
            config = write_server_config(work, paths)
            load.start("set-up: batchup worker pools")
            # before any server, client or loaded array: the process pools fork
            pools = S.BatchupPools({"thread": "thread", "process": "process", "augment": "process"})
            stack.callback(pools.close)
            extras["pool_construct"] = dict(pools.construct_s)
            extras["pool_startup"] = []
            data = {name: (np.load(xp), np.load(yp)) for name, (xp, yp) in paths.items()}
            stack.callback(data.clear)

            load.start("set-up: servers, clients, raw peers, drop-in shipping")
            log("starting servers, clients and raw PUSH peers")
            tcp = start_server(children, "tcp://127.0.0.1:0", config, 2, work)
            stack.callback(stop_server, tcp)
            ipc = start_server(children, f"ipc://{work}/ctl", config, 2, work)
            stack.callback(stop_server, ipc)
            raw = {}
            for name, scheme, senders in (("tcp", "tcp", 1), ("ipc", "ipc", 1), ("tcp2", "tcp", 2)):
                raw[name] = S.RawPeer(children, scheme, work, senders)
                stack.callback(raw[name].close)
            clients = {}
            for name, server in (("tcp", tcp), ("ipc", ipc), ("shm", tcp)):
                clients[name] = settle.add(batchup_client.connect(server.endpoint))
                # tcp and ipc rows measure the socket path; "shm" the same-host slot pool
                clients[name].shared_memory_batches = name == "shm"
                stack.callback(_close, clients[name])
            t0 = time.perf_counter()
            default = settle.add(batchup_client.default_client())  # the drop-in's embedded server
            stack.callback(_close, default)
            extras["dropin"] = {"default_client_s": time.perf_counter() - t0, "ship": {}}
            dropin = {}
            for w in settings.workloads:
                dropin[w.name] = ds = batchup_client.data_source.ArrayDataSource(
                    list(data[w.name]), repeats=1
                )
                t0 = time.perf_counter()
                it = ds.batch_iterator(256, shuffle=np.random.RandomState(0))
                next(it)  # the first call hashes the arrays and hands them to the server
                extras["dropin"]["ship"][w.name] = time.perf_counter() - t0
                it.close()  # type: ignore[attr-defined]

            extras["torch_startup"] = []
            for w in settings.workloads:
                X, y = data[w.name]
                in_process = batchup.data_source.ArrayDataSource([X, y], repeats=1)
                load.start(f"batchup pools: first epoch {w.name}")
                pooled = {}
                for kind, system in S.POOL_SYSTEMS.items():
                    ds = batchup.data_source.ArrayDataSource([X, y], repeats=1)
                    pooled[kind] = pools.parallel(kind, ds, settings.pool_buffer)
                    # the first epoch ships the source to the workers (process pool)
                    first = S.first_epoch(pooled[kind], 256)
                    extras["pool_startup"].append(
                        {"system": system, "workload": w.name, "batch": 256, **first}
                    )
                    log(f"{system}, {w.name}: first batch after {first['first_batch_s']:.2f} s")
                tcp_src, ipc_src = clients["tcp"].source(w.name), clients["ipc"].source(w.name)
                shm_src = clients["shm"].source(w.name)
                for bs in settings.batch_sizes:
                    load.start(f"throughput {w.name} batch {bs}")
                    log(f"{w.label}, batch {bs}")
                    torch_loaders = S.TorchLoaders(X, y, bs)
                    try:
                        systems = [
                            (S.BATCHUP, S.iterator_epoch(in_process, bs)),
                            (S.BATCHUP_THREADS, S.iterator_epoch(pooled["thread"], bs)),
                            (S.BATCHUP_PROCS, S.iterator_epoch(pooled["process"], bs)),
                            *torch_loaders.epochs(),
                            (S.SERVICE_TCP, S.iterator_epoch(tcp_src, bs)),
                            (S.SERVICE_IPC, S.iterator_epoch(ipc_src, bs)),
                            (S.SERVICE_SHM, S.iterator_epoch(shm_src, bs)),
                            (S.SERVICE_DROPIN, S.iterator_epoch(dropin[w.name], bs)),
                            (S.RAW_TCP, raw["tcp"].epoch_fn(w, bs)),
                            (S.RAW_IPC, raw["ipc"].epoch_fn(w, bs)),
                            (S.RAW_TCP_GATHER, raw["tcp"].epoch_fn(w, bs, gather=paths[w.name])),
                            (S.RAW_TCP_GATHER_2, raw["tcp2"].epoch_fn(w, bs, gather=paths[w.name])),
                        ]
                        results += measure_cell(settings, w, bs, systems, log, settle)
                        for system, first in torch_loaders.first_batch.items():
                            if system.endswith("2 workers"):
                                extras["torch_startup"].append(
                                    {
                                        "system": system,
                                        "workload": w.name,
                                        "batch": bs,
                                        "first_batch_s": first,
                                    }
                                )
                    finally:
                        torch_loaders.close()

            pools.close_pool("thread")
            pools.close_pool("process")
            key = next(w for w in settings.workloads if w.name == "cifar")
            extras["augmentation"], extras["training_step"] = augmentation_sections(
                settings,
                children,
                config,
                work,
                key,
                data[key.name],
                dropin[key.name],
                pools,
                load,
                extras,
                settle,
            )

            extras["fanin"] = fanin_section(settings, children, config, work, key, load, settle)

            load.start("connect latency, concurrency, embedded start")
            log("connect → first batch")
            extras["latency"] = S.connect_latency(settings, tcp.endpoint, key.name, 256)
            log(f"  {extras['latency']['total_median'] * 1e3:.1f} ms (median)")
            log("concurrent clients (tcp server)")
            extras["concurrency_workload"] = (key.name, 256)
            extras["concurrency"] = S.concurrency(settings, children, tcp.endpoint, key, 256, (1, 4), log)
            log("embedded server start")
            extras["embedded"] = S.embedded_start(settings)
            log(f"  connect() with no address: {extras['embedded']['start_median'] * 1e3:.0f} ms (median)")
            log("stopping servers and peers")
    finally:
        with shielded():
            children.close()
            for proc in multiprocessing.active_children():
                proc.terminate()
                proc.join(5)
            gc.collect()
            shutil.rmtree(work, ignore_errors=True)

    leaked = {p for p in leftover_folders() - before if os.path.exists(p) and owner_gone(p)}
    extras["leftovers"] = leaked
    if leaked:
        log(f"WARNING: folders left behind: {sorted(leaked)}")
    extras["leftover_children"] = live_children()
    if extras["leftover_children"]:
        log(f"WARNING: child processes still running: {extras['leftover_children']}")

    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, "RESULTS.md")
    png = os.path.join(out_dir, "results.png")
    duration = time.perf_counter() - t_start
    write_markdown(md, command, settings, results, extras, started, duration)
    write_plot(png, settings, results, ("quick smoke run — " if settings.quick else "") + started, extras)
    log(f"wrote {md} and {png} ({duration:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short smoke run: small arrays, one run, batch 256")
    p.add_argument("--out", default=BENCH_DIR, help="folder for RESULTS.md and results.png (default: bench/)")
    args = p.parse_args(argv)
    install_signal_handlers()
    os.environ.pop("BATCHUP_SERVER", None)  # the drop-in benchmark wants the embedded server
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    argv[0] = os.path.basename(argv[0])  # pyenv shims hand us the interpreter's full path
    command = shlex.join(argv)
    return run(Settings.make(args.quick), os.path.abspath(args.out), command)


if __name__ == "__main__":
    sys.exit(main())
