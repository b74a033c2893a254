"""Fixtures of the parity suite: one shared local server, and cleanup of the default client."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

import batchup_client

# Keep hypothesis' caches (it writes local-constant caches while collecting) out of the
# repository: no ``.hypothesis`` folder in /work/main. Removed at the end of the session.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="parity-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)


@pytest.fixture(scope="session", params=["shared-memory batches", "socket batches"])
def client(request: pytest.FixtureRequest) -> Iterator[batchup_client.Client]:
    """One private local server (2 workers) per batch transport, shared by the session."""
    c = batchup_client.connect(workers=2)
    c.shared_memory_batches = request.param == "shared-memory batches"
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="session", autouse=True)
def _close_default_client() -> Iterator[None]:
    """The drop-in ``ArrayDataSource`` starts the process-wide default client on first use;
    close it (and its private server) when the session ends."""
    yield
    default = batchup_client._default
    if default is not None and not default.closed:
        batchup_client.default_client().close()


@pytest.fixture(scope="session", autouse=True)
def _hypothesis_home_in_tmp() -> Iterator[None]:
    yield
    set_hypothesis_home_dir(None)
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)
