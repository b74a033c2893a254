from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import numpy as np
import pytest

from tests.servers import RunningServer


@pytest.fixture
def server() -> Iterator[RunningServer]:
    """A real batchup-server (demo source, 2 workers) on a random tcp port."""
    srv = RunningServer("--workers", "2", "--log-level", "debug")
    try:
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, "".join(srv.lines)


@pytest.fixture
def arrays_dir(tmp_path: object) -> Iterator[str]:
    yield str(tmp_path)


@pytest.fixture(autouse=True)
def _no_leftover_server_folders() -> Iterator[None]:
    """Every test leaves /dev/shm and /tmp as it found them (servers clean up)."""
    before = set(glob.glob("/dev/shm/batchup-*")) | set(glob.glob("/tmp/batchup-*"))
    yield
    after = set(glob.glob("/dev/shm/batchup-*")) | set(glob.glob("/tmp/batchup-*"))
    leaked = {p for p in after - before if _owner_gone(p)}
    assert not leaked, f"left behind: {sorted(leaked)}"


def _owner_gone(path: str) -> bool:
    """Folders of servers/clients still alive (e.g. a session-wide client) are not leaks."""
    pids = [p for p in os.path.basename(path).split("-") if p.isdigit()]
    return bool(pids) and not os.path.exists(f"/proc/{pids[0]}")


@pytest.fixture
def rng() -> np.random.RandomState:
    return np.random.RandomState(1234)
