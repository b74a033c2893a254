"""Run every benchmark side by side and write RESULTS.md and results.png.

    python3 bench/run.py            # full run (~3–5 min on 2 cores)
    python3 bench/run.py --quick    # smoke run on small arrays (< 60 s)
    python3 bench/run.py --out DIR  # write RESULTS.md / results.png into DIR (default: bench/)

Systems: batchup 0.2.3 in process, PyTorch DataLoader (4 set-ups), the service over tcp
and ipc, the drop-in ArrayDataSource on the embedded server, and raw pyzmq PUSH/PULL
moving the same bytes. Plus connect→first-batch latency, embedded-server start time and
1 vs 4 concurrent clients. Every child process is stopped and every temporary folder
removed on every exit path.
"""

from __future__ import annotations

import argparse
import contextlib
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
from _common import (
    BENCH_DIR,
    Children,
    LoadMonitor,
    Result,
    Settings,
    install_signal_handlers,
    leftover_folders,
    make_data,
    measure_cell,
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
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(load.stop)
            load.start("data generation")
            log(f"generating data in {work}")
            paths = make_data(work, settings.workloads)
            config = write_server_config(work, paths)
            data = {name: (np.load(xp), np.load(yp)) for name, (xp, yp) in paths.items()}
            stack.callback(data.clear)

            load.start("set-up: servers, clients, raw peers, drop-in shipping")
            log("starting servers, clients and raw PUSH peers")
            tcp = start_server(children, "tcp://127.0.0.1:0", config, 2, work)
            stack.callback(stop_server, tcp)
            ipc = start_server(children, f"ipc://{work}/ctl", config, 2, work)
            stack.callback(stop_server, ipc)
            raw = {scheme: S.RawPeer(children, scheme, work) for scheme in ("tcp", "ipc")}
            for peer in raw.values():
                stack.callback(peer.close)
            clients = {}
            for name, server in (("tcp", tcp), ("ipc", ipc), ("shm", tcp)):
                clients[name] = batchup_client.connect(server.endpoint)
                # tcp and ipc rows measure the socket path; "shm" the same-host slot pool
                clients[name].shared_memory_batches = name == "shm"
                stack.callback(_close, clients[name])
            t0 = time.perf_counter()
            default = batchup_client.default_client()  # the drop-in's embedded server
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
                tcp_src, ipc_src = clients["tcp"].source(w.name), clients["ipc"].source(w.name)
                shm_src = clients["shm"].source(w.name)
                for bs in settings.batch_sizes:
                    load.start(f"throughput {w.name} batch {bs}")
                    log(f"{w.label}, batch {bs}")
                    torch_loaders = S.TorchLoaders(X, y, bs)
                    try:
                        systems = [
                            (S.BATCHUP, S.iterator_epoch(in_process, bs)),
                            *torch_loaders.epochs(),
                            (S.SERVICE_TCP, S.iterator_epoch(tcp_src, bs)),
                            (S.SERVICE_IPC, S.iterator_epoch(ipc_src, bs)),
                            (S.SERVICE_SHM, S.iterator_epoch(shm_src, bs)),
                            (S.SERVICE_DROPIN, S.iterator_epoch(dropin[w.name], bs)),
                            (S.RAW_TCP, raw["tcp"].epoch_fn(w, bs)),
                            (S.RAW_IPC, raw["ipc"].epoch_fn(w, bs)),
                        ]
                        results += measure_cell(settings, w, bs, systems, log)
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

            load.start("connect latency, concurrency, embedded start")
            key = next(w for w in settings.workloads if w.name == "cifar")
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

    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, "RESULTS.md")
    png = os.path.join(out_dir, "results.png")
    duration = time.perf_counter() - t_start
    write_markdown(md, command, settings, results, extras, started, duration)
    write_plot(png, settings, results, ("quick smoke run — " if settings.quick else "") + started)
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
