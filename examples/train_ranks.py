"""One rank of a data-parallel job whose mini-batches are streamed from batchup-servers.

    RANK=0 WORLD_SIZE=2 BATCHUP_SERVER=tcp://server-a:5555,tcp://server-b:5555 \\
        python examples/train_ranks.py --dataset mnist --epochs 2 --out-dir /results
    python examples/train_ranks.py --check /results     # the ranks' shards, epoch by epoch

This is the trainer of docker/docker-compose.yml (one container per rank). Every rank
connects to ALL the servers of ``BATCHUP_SERVER`` (the client merges their batches in
order, and drops a server that stops answering heartbeats mid-epoch, its outstanding
batches remade by the others), and takes its shard of each epoch with
``batch_iterator(..., shuffle=RandomState(SEED), rank=RANK, world_size=WORLD_SIZE)``:
the same seed on every rank, so that the ranks cut the same global stream. It trains a
softmax regression, draws its batches with ``include_indices=True``, and writes every
sample index it received, per epoch, to ``OUT_DIR/rank<RANK>.json``.

On stdout: a ``progress`` line per batch (wall-clock time included, so a test can act
mid-epoch), and per epoch a summary with the largest gap between two batches (the stall
when a server is lost). ``--check DIR`` reads the ranks' files and exits 1 unless, in
every epoch, their indices together cover each sample of the split exactly once.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np

import batchup_client
from batchup_client.distributed import shard_from_env


def server_addresses(value: str | None) -> list[str]:
    """``BATCHUP_SERVER``: one address or several, comma-separated."""
    addresses = [a.strip() for a in (value or "").split(",") if a.strip()]
    if not addresses:
        raise SystemExit("train_ranks.py: set BATCHUP_SERVER (or --server) to the server address(es)")
    return addresses


def open_source(addresses: list[str], dataset: str, server_timeout: float | None) -> tuple[Any, Any, int]:
    """Connect to every server of ``addresses``; return ``(client, training split, N)``.

    The keys come from ``$BATCHUP_SERVER_KEY`` / ``$BATCHUP_CLIENT_KEY`` when set.
    """
    client = batchup_client.connect(addresses, timeout=30.0, server_timeout=server_timeout)
    try:
        train = client.source(dataset, split="train", n_val=0, include_indices=True, wait=120.0)
        n = len(train)
    except BaseException:
        client.close()
        raise
    return client, train, n


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train(args: argparse.Namespace) -> int:
    shard = shard_from_env()
    rank, world_size = shard.get("rank", 0), shard.get("world_size", 1)
    addresses = server_addresses(args.server)
    client, source, n = open_source(addresses, args.dataset, args.server_timeout)
    steps = -(-n // (args.batch_size * world_size))
    record: dict[str, Any] = {
        "rank": rank,
        "world_size": world_size,
        "dataset": args.dataset,
        "n": n,
        "servers": addresses,
        "seed": args.seed,
        "epochs": [],
        "stalls": [],
        "servers_alive": [],
    }
    with client:
        print(
            f"rank {rank}/{world_size}: servers {','.join(addresses)}, {args.dataset} train N={n}, "
            f"{steps} steps of {args.batch_size} per epoch, seed {args.seed}, batches via "
            f"{client.info()['batch_transport']}",
            flush=True,
        )
        W: np.ndarray | None = None
        b: np.ndarray | None = None
        rng = np.random.RandomState(args.seed)  # the same seed on every rank
        for epoch in range(args.epochs):
            start, seen, loss_sum = time.perf_counter(), [], 0.0
            # gap: the longest wait for a batch (the trainer's own work and --sleep excluded)
            last, gap, gap_at, gap_end = time.time(), 0.0, 0, 0.0
            for step, (ndx, X, y) in enumerate(
                source.batch_iterator(args.batch_size, shuffle=rng, rank=rank, world_size=world_size)
            ):
                now = time.time()
                if step and now - last > gap:
                    gap, gap_at, gap_end = now - last, step, now
                seen.append(np.asarray(ndx, np.int64))
                if len(y):
                    X = X.reshape(len(X), -1)
                    if W is None:
                        W = np.zeros((X.shape[1], 10), np.float32)
                        b = np.zeros(10, np.float32)
                    assert b is not None
                    p = softmax(X @ W + b)
                    loss_sum += float(-np.log(p[np.arange(len(y)), y] + 1e-12).sum())
                    p[np.arange(len(y)), y] -= 1.0
                    W -= args.lr * (X.T @ p) / len(y)
                    b -= args.lr * p.mean(axis=0)
                print(f"progress rank {rank} epoch {epoch} batch {step + 1}/{steps} t={now:.3f}", flush=True)
                if args.sleep:
                    time.sleep(args.sleep)
                last = time.time()
            indices = np.concatenate(seen) if seen else np.zeros(0, np.int64)
            record["epochs"].append(indices.tolist())
            record["stalls"].append({"max_gap_s": round(gap, 3), "before_batch": gap_at + 1, "t": gap_end})
            alive = client.info().get("servers", {})
            record["servers_alive"].append(alive)
            elapsed = time.perf_counter() - start
            print(
                f"rank {rank} epoch {epoch}: {len(indices)} samples in {len(seen)} batches, "
                f"loss {loss_sum / max(len(indices), 1):.4f}, {elapsed:.2f}s; max gap between "
                f"batches {gap:.3f}s (before batch {gap_at + 1}, ended t={gap_end:.3f}); "
                f"servers alive at the end: {alive}; done t={time.time():.3f}",
                flush=True,
            )
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
    print(f"rank {rank}: wrote {path}", flush=True)
    return 0


def check(folder: str, world_size: int | None) -> int:
    """Exit status 0 when every epoch's shards cover each index exactly once."""
    records = []
    for path in sorted(glob.glob(os.path.join(folder, "rank*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    problems = []
    if not records:
        problems.append(f"no rank*.json in {folder}")
    else:
        expected = world_size if world_size is not None else records[0]["world_size"]
        ranks = sorted(r["rank"] for r in records)
        if ranks != list(range(expected)):
            problems.append(f"ranks {ranks} reported, expected 0..{expected - 1}")
        if len({r["n"] for r in records}) != 1:
            problems.append(f"ranks disagree on N: {[r['n'] for r in records]}")
        if len({len(r["epochs"]) for r in records}) != 1:
            problems.append(f"ranks ran different numbers of epochs: {[len(r['epochs']) for r in records]}")
        n = records[0]["n"]
        for epoch in range(min(len(r["epochs"]) for r in records)):
            counts = np.zeros(n, np.int64)
            for r in records:
                idx = np.asarray(r["epochs"][epoch], np.int64)
                if idx.size and (idx.min() < 0 or idx.max() >= n):
                    problems.append(f"epoch {epoch}: rank {r['rank']} saw indices outside [0, {n})")
                    idx = idx[(idx >= 0) & (idx < n)]
                np.add.at(counts, idx, 1)
            missing, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
            status = "ok" if not (missing.size or repeated.size) else "FAILED"
            per_rank = ", ".join("rank {}: {}".format(r["rank"], len(r["epochs"][epoch])) for r in records)
            print(
                f"epoch {epoch}: {counts.sum()} samples over {len(records)} ranks ({per_rank}); "
                f"missing {missing.size}, seen more than once {repeated.size}: {status}"
            )
            if missing.size:
                problems.append(
                    f"epoch {epoch}: {missing.size} indices never seen, e.g. {missing[:5].tolist()}"
                )
            if repeated.size:
                problems.append(
                    f"epoch {epoch}: {repeated.size} indices seen twice or more, e.g. {repeated[:5].tolist()}"
                )
    for p in problems:
        print(f"check: {p}", file=sys.stderr)
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", default=os.environ.get("BATCHUP_SERVER"), help="default: $BATCHUP_SERVER")
    parser.add_argument(
        "--dataset", default="mnist", help="a standard dataset the servers hold (default mnist)"
    )
    parser.add_argument("--epochs", type=int, default=2, help="passes over the shard (default 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--seed", type=int, default=12345, help="shuffling seed, the same on every rank (default 12345)"
    )
    parser.add_argument(
        "--sleep", type=float, default=0.0, help="seconds to pause after each batch (a slow trainer)"
    )
    parser.add_argument(
        "--server-timeout",
        type=float,
        default=float(os.environ.get("BATCHUP_SERVER_TIMEOUT") or 5.0),
        help="drop a server silent this long and remake its batches on the others "
        "(default $BATCHUP_SERVER_TIMEOUT or 5)",
    )
    parser.add_argument("--out-dir", default="/results", help="where rank<RANK>.json goes (default /results)")
    parser.add_argument("--check", metavar="DIR", help="check the ranks' files in DIR instead of training")
    parser.add_argument("--world-size", type=int, help="with --check: the number of ranks expected")
    args = parser.parse_args()
    if args.check:
        return check(args.check, args.world_size)
    # The client's warnings (a server lost, a server back) go to stderr.
    logging.basicConfig(level=logging.WARNING, format="t=%(created).3f %(name)s %(levelname)s %(message)s")
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
