#!/usr/bin/env bash
# Install batchup-service into ./.venv, start a batchup-server serving the built-in demo
# data, and train examples/train.py on batches streamed from it. The server is stopped
# on every exit path.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
tmp=$(mktemp -d)
.venv/bin/batchup-server --bind tcp://127.0.0.1:0 --workers 2 >"$tmp/ready" &
server=$!
cleanup() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
for _ in $(seq 300); do
    grep -q "ready on" "$tmp/ready" 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || { echo "batchup-server failed to start" >&2; exit 1; }
    sleep 0.1
done
address=$(sed -n 's/^batchup-server ready on //p' "$tmp/ready")
echo "batchup-server is serving on $address"
.venv/bin/python examples/train.py --server "$address" "$@"
