"""The embedded local server: a private ``batchup-server`` child process.

``batchup_client.connect()`` with no address starts one, like ``dask.distributed.Client()``.
Its control endpoint is an ipc socket inside a fresh 0700 folder, so only this user can
reach it; it exits when this process does (it watches our pid).
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time

from batchup_protocol.host import make_private_dir, sweep_stale

from .errors import ConnectionLost

__all__ = ["LocalServer"]


class LocalServer:
    """Start ``python -m batchup_server`` privately and wait until it is ready."""

    def __init__(self, workers: int | None = None, startup_timeout: float = 60.0):
        sweep_stale(tempfile.gettempdir(), "batchup-local-")
        self._pid = os.getpid()
        self.folder = make_private_dir("batchup-local-")
        self.endpoint = f"ipc://{self.folder}/control"
        n = workers if workers is not None else min(2, os.cpu_count() or 1)
        cmd = [
            sys.executable,
            "-m",
            "batchup_server",
            "--bind",
            self.endpoint,
            "--workers",
            str(n),
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            "warning",
            "--download",  # as batchup: a dataset is fetched on first use
            "--trust-client-code",  # this process's own user, over a private 0700 ipc folder
        ]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + startup_timeout
        line = ""
        try:
            while not line.startswith("batchup-server ready"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    raise ConnectionLost(
                        f"the embedded batchup-server did not start within {startup_timeout:g}s"
                    )
                line = self.process.stdout.readline()
                if not line:
                    code = self.process.wait(5)
                    raise ConnectionLost(
                        f"the embedded batchup-server exited with code {code} while starting"
                    )
        except BaseException:
            self.stop()
            raise
        finally:
            sel.close()
        self.process.stdout.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``). Idempotent; does
        nothing in a forked child (the server and its folder are the parent's)."""
        if os.getpid() != self._pid:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.process.stdout is not None and not self.process.stdout.closed:
            self.process.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)
