"""One client process of the concurrency benchmark (and of the fan-in section's pair of
independent trainers).

``python3 _client_proc.py ADDRESS SOURCE BATCH EPOCHS SEED [augment] [socket]``: connects,
iterates one warm-up epoch, prints ``ready``; then for every ``go`` line on stdin iterates
EPOCHS shuffled epochs and prints one JSON line ``{"samples", "batches", "t0", "t1"}``
(``time.monotonic()``, comparable across processes on Linux); for every ``settle`` line
closes the stream it opened ahead for a next epoch and prints ``settled``. Exits at EOF on
stdin. ``augment``: the source is ``.map(augment)`` (bench/_augment.py); ``socket``:
batches come over the socket, not through shared memory.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import numpy as np

import batchup_client


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # so the client closes (and removes its folder)


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    address, source = sys.argv[1], sys.argv[2]
    batch, epochs, seed = (int(a) for a in sys.argv[3:6])
    flags = set(sys.argv[6:])
    client = batchup_client.connect(address)
    try:
        if "socket" in flags:
            client.shared_memory_batches = False
        src = client.source(source)
        if "augment" in flags:
            from _augment import augment  # (this script's folder is on sys.path)

            src = src.map(augment)
        for _ in src.batch_iterator(batch, shuffle=np.random.RandomState(seed)):
            pass
        print("ready", flush=True)
        for run, line in enumerate(sys.stdin, start=1):
            if line.strip() == "settle":
                client.close_ahead()
                print("settled", flush=True)
                continue
            if line.strip() != "go":
                break
            rng = np.random.RandomState(seed + run)
            samples = batches = 0
            t0 = time.monotonic()
            for _ in range(epochs):
                for X, _y in src.batch_iterator(batch, shuffle=rng):
                    samples += len(X)
                    batches += 1
            t1 = time.monotonic()
            print(json.dumps({"samples": samples, "batches": batches, "t0": t0, "t1": t1}), flush=True)
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
