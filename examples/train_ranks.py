"""One rank of a data-parallel job whose mini-batches are streamed from batchup-servers.

    RANK=0 WORLD_SIZE=2 BATCHUP_SERVER=tcp://server-a:5555,tcp://server-b:5555 \\
        python examples/train_ranks.py --dataset mnist --epochs 2 --out-dir /results
    python examples/train_ranks.py --check /results     # the ranks' shards, epoch by epoch

This is the trainer of docker/docker-compose.yml (one container per rank). Each rank
trains a softmax regression on its shard of the dataset's training split, draws its
batches with ``include_indices=True``, and writes every sample index it received, per
epoch, to ``OUT_DIR/rank<RANK>.json`` (also a summary line per epoch on stdout).
``--check DIR`` reads those files and exits 1 unless, in every epoch, the ranks' indices
together cover each sample of the split exactly once.

Sharding today: the client talks to one server at a time and does not know ranks, so rank
``r`` uses server ``r % len(servers)`` and the samples ``np.arange(r, N, WORLD_SIZE)``
(``indices=``). See :func:`open_shard` for what changes when the client shards itself.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Any

import numpy as np

import batchup_client


def server_addresses(value: str | None) -> list[str]:
    """``BATCHUP_SERVER``: one address or several, comma-separated."""
    addresses = [a.strip() for a in (value or "").split(",") if a.strip()]
    if not addresses:
        raise SystemExit("train_ranks.py: set BATCHUP_SERVER (or --server) to the server address(es)")
    return addresses


def open_shard(addresses: list[str], rank: int, world_size: int, dataset: str) -> tuple[Any, Any, str, int]:
    """Connect and return ``(client, source, server address, N)`` for this rank's shard.

    TODO(multi-server): when ``batchup_client.connect`` accepts several addresses and
    ``rank=``/``world_size=``, connect to all of ``addresses`` with those and drop both
    the ``addresses[rank % ...]`` choice and the ``indices=`` argument below; the check
    (``--check``) stays as it is.
    """
    address = addresses[rank % len(addresses)]
    client = batchup_client.connect(address, timeout=30.0)
    try:
        full = client.source(dataset, split="train", n_val=0)
        n = len(full)
        shard = client.source(
            dataset,
            split="train",
            n_val=0,
            indices=np.arange(rank, n, world_size),
            include_indices=True,
            wait=120.0,
        )
    except BaseException:
        client.close()
        raise
    return client, shard, address, n


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train(args: argparse.Namespace) -> int:
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world_size:
        raise SystemExit(f"train_ranks.py: RANK={rank} should be in [0, WORLD_SIZE={world_size})")
    addresses = server_addresses(args.server)
    client, shard, address, n = open_shard(addresses, rank, world_size, args.dataset)
    record: dict[str, Any] = {
        "rank": rank,
        "world_size": world_size,
        "dataset": args.dataset,
        "n": n,
        "server": address,
        "epochs": [],
    }
    rng = np.random.RandomState(args.seed + rank)
    with client:
        print(
            f"rank {rank}/{world_size}: {address} (server {client.server_id}), {args.dataset} train "
            f"N={n}, shard of {len(np.arange(rank, n, world_size))}, batches via "
            f"{client.info()['batch_transport']}",
            flush=True,
        )
        W: np.ndarray | None = None
        b: np.ndarray | None = None
        for epoch in range(args.epochs):
            start, seen, loss_sum = time.perf_counter(), [], 0.0
            for ndx, X, y in shard.batch_iterator(batch_size=args.batch_size, shuffle=rng):
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
                seen.append(np.asarray(ndx, np.int64))
            indices = np.concatenate(seen) if seen else np.zeros(0, np.int64)
            record["epochs"].append(indices.tolist())
            elapsed = time.perf_counter() - start
            print(
                f"rank {rank} epoch {epoch}: {len(indices)} samples in {len(seen)} batches, "
                f"loss {loss_sum / max(len(indices), 1):.4f}, {elapsed:.2f}s",
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
            per_rank = ", ".join(
                "rank {}@{}: {}".format(r["rank"], r["server"], len(r["epochs"][epoch])) for r in records
            )
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
    parser.add_argument("--seed", type=int, default=12345, help="shuffling seed (plus the rank)")
    parser.add_argument("--out-dir", default="/results", help="where rank<RANK>.json goes (default /results)")
    parser.add_argument("--check", metavar="DIR", help="check the ranks' files in DIR instead of training")
    parser.add_argument("--world-size", type=int, help="with --check: the number of ranks expected")
    args = parser.parse_args()
    if args.check:
        return check(args.check, args.world_size)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
