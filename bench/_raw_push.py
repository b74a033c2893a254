"""Raw pyzmq baseline, sender side: PUSH pre-built batches (X frame + y frame, copy=False).

Started by ``run.py``; connects a PULL to the benchmark's command endpoint and a PUSH to
its data endpoint. Commands are JSON:

* ``{"op": "hello"}`` → one small message, so the receiver knows the pipe is up;
* ``{"op": "send", "rows": N, "batch": B, "x_row": BYTES, "y_row": BYTES}`` → one
  epoch's worth of batches (the last one short, as batchup's), same byte sizes as the
  service's X and y frames;
* the same with ``"gather": {"x": PATH, "y": PATH, "seed": S}`` → one shuffled epoch of
  the ``.npy`` files the server reads, each batch gathered (``np.take`` of memory-mapped
  rows into a new array, the glibc heap tuned as in the service's workers) before it is
  sent: the service's work on the socket path, without the service;
* either with ``"part": [K, N]`` → only batches K, K + N, K + 2N, … of the epoch (N
  senders share one epoch, as the service's N workers do);
* ``{"op": "stop"}`` → exit.

Exits on its own when the benchmark process goes away.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import zmq

from batchup_protocol.host import tune_malloc

HWM = 32


def main() -> int:
    command_endpoint, data_endpoint, parent = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ctx = zmq.Context()
    try:
        commands = ctx.socket(zmq.PULL)
        commands.setsockopt(zmq.LINGER, 0)
        commands.connect(command_endpoint)
        data = ctx.socket(zmq.PUSH)
        data.setsockopt(zmq.LINGER, 0)
        data.setsockopt(zmq.SNDHWM, HWM)
        data.connect(data_endpoint)
        buffers: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        sources: dict[str, np.ndarray] = {}
        tune_malloc()
        while True:
            if not commands.poll(500):
                if os.getppid() != parent:
                    return 0
                continue
            cmd = json.loads(commands.recv())
            if cmd["op"] == "stop":
                return 0
            if cmd["op"] == "hello":
                data.send_multipart([b"hello"])
                continue
            rows, batch, x_row, y_row = cmd["rows"], cmd["batch"], cmd["x_row"], cmd["y_row"]
            k, n_parts = cmd.get("part", (0, 1))
            if "gather" in cmd:
                g = cmd["gather"]
                for path in (g["x"], g["y"]):
                    if path not in sources:
                        sources[path] = np.load(path, mmap_mode="r").view(np.ndarray)
                X, Y = sources[g["x"]], sources[g["y"]]
                order = np.random.RandomState(g["seed"]).permutation(len(X))
                for start in range(k * batch, len(order), n_parts * batch):
                    idx = order[start : start + batch]
                    xb, yb = np.take(X, idx, axis=0), np.take(Y, idx, axis=0)
                    data.send_multipart([xb, yb], copy=False)
                continue
            key = (batch * x_row, batch * y_row)
            if key not in buffers:
                # touched, non-zero pages (a calloc'd zero page would be unrealistically cheap)
                x = (np.arange(key[0], dtype=np.int64) % 251).astype(np.uint8)
                y = (np.arange(key[1], dtype=np.int64) % 7).astype(np.uint8)
                buffers[key] = (x, y)
            x, y = buffers[key]
            for start in range(k * batch, rows, n_parts * batch):
                n = min(batch, rows - start)
                data.send_multipart([x[: n * x_row].data, y[: n * y_row].data], copy=False)
    finally:
        ctx.destroy(linger=0)


if __name__ == "__main__":
    sys.exit(main())
