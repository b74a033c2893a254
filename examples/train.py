"""Train a softmax regression on mini-batches streamed from a batchup-server.

    python examples/train.py                                # a private local server
    python examples/train.py --server tcp://127.0.0.1:5555  # a running batchup-server

Uses the server's built-in "demo" source (10 classes, 64 features): the first 10,000
samples train, the last 2,000 validate. Prints the loss per epoch and the batches/s
the training loop received.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import tqdm

import batchup_client


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("BATCHUP_SERVER"),
        help="server address (default: $BATCHUP_SERVER, else a private local server)",
    )
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training set (default 5)")
    parser.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default 64)")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    parser.add_argument("--seed", type=int, default=12345, help="shuffling seed (default 12345)")
    args = parser.parse_args()

    with batchup_client.connect(args.server) as client:
        print(
            f"connected to {client.address} (server {client.server_id}); sources: {client.sources}; "
            f"batches via {client.info()['batch_transport']}"
        )
        train = client.source("demo", indices=np.arange(0, 10000))
        val = client.source("demo", indices=np.arange(10000, 12000))
        n_features, n_classes = 64, 10
        W = np.zeros((n_features, n_classes), dtype=np.float32)
        b = np.zeros(n_classes, dtype=np.float32)
        rng = np.random.RandomState(args.seed)

        def f_eval(X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
            p = softmax(X @ W + b)
            loss = -np.log(p[np.arange(len(y)), y] + 1e-12).sum()
            err = (p.argmax(axis=1) != y).sum()
            return float(loss), float(err)

        for epoch in range(1, args.epochs + 1):
            start, n_batches, train_loss, n_samples = time.perf_counter(), 0, 0.0, 0
            for X, y in train.batch_iterator(batch_size=args.batch_size, shuffle=rng):
                p = softmax(X @ W + b)
                train_loss += -np.log(p[np.arange(len(y)), y] + 1e-12).sum()
                p[np.arange(len(y)), y] -= 1.0  # d loss / d logits
                W -= args.lr * (X.T @ p) / len(y)
                b -= args.lr * p.mean(axis=0)
                n_batches += 1
                n_samples += len(y)
            elapsed = time.perf_counter() - start
            val_loss, val_err = val.batch_map_mean(f_eval, batch_size=500)
            print(
                f"epoch {epoch}: train loss {train_loss / n_samples:.4f}  val loss {val_loss:.4f}  "
                f"val error {val_err:.2%}  |  {n_batches / elapsed:,.0f} batches/s received"
            )
        (pred,) = val.batch_map_concat(
            lambda X, y: softmax(X @ W + b).argmax(axis=1), batch_size=500, progress_iter_func=tqdm.tqdm
        )
        print(f"final validation accuracy: {(pred == val.samples_by_indices(np.arange(2000))[1]).mean():.2%}")


if __name__ == "__main__":
    main()
