"""The benchmark suite runs end to end: ``python3 bench/run.py --quick --out DIR``.

The quick run (small arrays, one timed run, batch 256) takes ~15–25 s on 2 cores. It needs
the ``bench`` extra (torch, batchup, matplotlib): without them the test is skipped, except
under ``CI=true``, where a missing dependency fails it.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
QUICK_DEADLINE = 90.0  # seconds; the quick run is designed to stay well under 60 s
TABLE_HEADER = "| workload | batch | system | samples/s | batches/s |"


def _require(module: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        try:
            __import__(module)
        except ImportError as exc:
            pytest.fail(f"CI=true but the benchmark dependency {module!r} is missing: {exc}")
    else:
        pytest.importorskip(module)


@pytest.mark.timeout(QUICK_DEADLINE + 60)
def test_quick_benchmark_run_writes_results(tmp_path: Path) -> None:
    for module in ("torch", "batchup", "matplotlib"):
        _require(module)
    out = tmp_path / "out"
    # a short private temp folder: ipc paths must fit in 107 bytes, and leftovers are easy to see
    tmp = tempfile.mkdtemp(prefix="bq-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "BATCHUP_SERVER"}
    env["TMPDIR"] = tmp
    shm_before = set(glob.glob("/dev/shm/batchup-*"))
    proc = subprocess.Popen(
        [sys.executable, "bench/run.py", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        t0 = time.monotonic()
        try:
            output, _ = proc.communicate(timeout=QUICK_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # run.py cleans up its children on SIGTERM
            output, _ = proc.communicate(timeout=30)
            pytest.fail(f"bench/run.py --quick did not finish within {QUICK_DEADLINE:g}s:\n{output[-4000:]}")
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, output[-4000:]
        results = (out / "RESULTS.md").read_text()
        assert TABLE_HEADER in results
        assert "Command (run in" in results and "--quick" in results
        assert "## Key targets" in results and "service tcp vs raw pyzmq tcp" in results
        # the raw peer that gathers each batch ran (the service's socket-path work, bare)
        assert "| raw pyzmq PUSH/PULL tcp, gathering each batch (np.take) |" in results
        assert "service tcp vs raw pyzmq tcp that also gathers each batch" in results
        # fan-in against its bound: the same two servers, each feeding its own client process
        assert "| bound: 2 servers (pinned to cores 0 and 1), each feeding its own client process" in results
        assert "fan-in ÷ bound" in results
        assert (out / "results.png").stat().st_size > 1000
        left = os.listdir(tmp)
        assert not left, f"bench/run.py left {left} in its temp folder"
        leaked = [p for p in set(glob.glob("/dev/shm/batchup-*")) - shm_before if _owner_gone(p)]
        assert not leaked, f"bench/run.py left {leaked} in /dev/shm"
        print(f"quick benchmark run took {elapsed:.1f}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _owner_gone(path: str) -> bool:
    pids = [p for p in os.path.basename(path).split("-") if p.isdigit()]
    return bool(pids) and not os.path.exists(f"/proc/{pids[0]}")


@pytest.mark.timeout(120)
def test_cpu_profile_reports_each_process_and_thread_per_batch(tmp_path: Path) -> None:
    """``bench/cpu_profile.py --quick``: per-thread CPU per delivered batch of the router,
    each worker and the client, their sum and the ceiling it sets; nothing left behind."""
    tmp = tempfile.mkdtemp(prefix="bc-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHUP_")}
    env["TMPDIR"] = tmp
    try:
        done = subprocess.run(
            [sys.executable, "bench/cpu_profile.py", "--quick", "--workers", "2", "--epochs", "20"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        out = done.stdout
        assert "batches via shared memory: 20 epochs, 400 batches" in out
        rows = [line.split("|") for line in out.splitlines() if line.startswith("| ")]
        roles = {r[1].strip() for r in rows}
        assert {"server router", "server worker 0", "server worker 1", "client"} <= roles, roles
        total = next(float(r[3].strip(" *")) for r in rows if r[1].strip() == "**all**")
        parts = sum(float(r[3]) for r in rows if not r[1].startswith(" **") and r[1].strip() != "process")
        assert total > 0 and abs(total - parts) < 0.01
        assert "allows at most" in out
        assert not os.listdir(tmp), "cpu_profile.py left files in its temp folder"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
