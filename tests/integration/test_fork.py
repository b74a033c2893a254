"""A process that forks after using the client: the child's exit leaves the parent's
client, folders and embedded server alone; drop-in sources in the child get a client of
its own; the parent's client, used in the child, fails at once instead of hanging."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

import pytest

SCRIPT = r"""
import json, os, signal, sys, time
import numpy as np
import batchup_client
from batchup_client import data_source as cds
import batchup.data_source as bds

signal.alarm(60)  # a hang fails the test instead of stalling it
X = np.arange(3000 * 4, dtype=np.float32).reshape(3000, 4)
y = np.arange(3000, dtype=np.int64)


def ref(seed):
    return list(bds.ArrayDataSource([X, y]).batch_iterator(128, shuffle=np.random.RandomState(seed)))


def same(got, want):
    return len(got) == len(want) and all(
        all(np.array_equal(a, b) for a, b in zip(g, w)) for g, w in zip(got, want)
    )


ds = cds.ArrayDataSource([X, y])
out = {"parent_before": same(list(ds.batch_iterator(128, shuffle=np.random.RandomState(1))), ref(1))}
parent_client = batchup_client.default_client()
child_report = os.pipe()
pid = os.fork()
if pid == 0:  # the child: its exit runs the atexit handlers it inherited
    signal.alarm(30)  # alarms do not cross a fork
    os.close(child_report[0])
    report = {}
    t0 = time.monotonic()
    try:
        parent_client.source  # attribute access is fine; a request is not
        parent_client.array_source([X, y])
        report["parent_client"] = "no error"
    except batchup_client.ClientClosed as exc:
        report["parent_client"] = "ClientClosed" if "forked" in str(exc) else str(exc)
    report["parent_client_s"] = time.monotonic() - t0
    got = list(ds.batch_iterator(128, shuffle=np.random.RandomState(2)))  # its own client
    report["child_dropin"] = same(got, ref(2))
    report["child_server_pid"] = batchup_client.default_client().info()["server_id"]
    with os.fdopen(child_report[1], "w") as f:
        json.dump(report, f)
    sys.exit(0)
os.close(child_report[1])
with os.fdopen(child_report[0]) as f:
    out["child"] = json.load(f)
_, status = os.waitpid(pid, 0)
out["child_status"] = status
out["parent_after"] = same(list(ds.batch_iterator(128, shuffle=np.random.RandomState(3))), ref(3))
out["same_client"] = batchup_client.default_client() is parent_client
out["parent_server_id"] = parent_client.info()["server_id"]
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_neither_breaks_the_parent_nor_hangs():
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "batchup-*")))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["parent_before"] and got["parent_after"] and got["same_client"]
    assert got["child_status"] == 0
    child = got["child"]
    assert child["parent_client"] == "ClientClosed" and child["parent_client_s"] < 5
    assert child["child_dropin"]  # a client of its own, the same batches as batchup
    assert child["child_server_pid"] != got["parent_server_id"]  # not the parent's server
    leftover = set(glob.glob(os.path.join(tempfile.gettempdir(), "batchup-*"))) - before
    assert not leftover, leftover  # both processes' folders went at their exits
