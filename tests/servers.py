"""Real ``batchup-server`` processes for tests: start on a random port, read logs, stop."""

from __future__ import annotations

import os
import queue
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from batchup_protocol.host import sweep_stale

JOIN_TIMEOUT = 20.0


def children_of(pid: int) -> list[int]:
    """Direct child pids of ``pid`` (from /proc)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def worker_pids(server_pid: int) -> list[int]:
    """The server's worker processes (not multiprocessing's resource tracker)."""
    out = []
    for pid in children_of(server_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read() and pid_alive(pid):
                    out.append(pid)
        except OSError:
            pass
    return out


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until(predicate: Any, timeout: float = JOIN_TIMEOUT, what: str = "condition") -> None:
    """Poll ``predicate`` (bounded), for states only observable from outside (process exits)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # noqa: sleep-ok (polling another process's state with a deadline)
        delay = min(delay * 2, 0.2)


class RunningServer:
    """A ``python -m batchup_server`` subprocess whose stderr is collected line by line."""

    def __init__(
        self,
        *args: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
        where: str = "",
    ):
        """``prefix`` goes before the command (e.g. ``ip netns exec HOST``, which execs the
        server, so the pid stays the server's); ``where`` names it in a failure."""
        cmd = [*prefix, sys.executable, "-m", "batchup_server", *args]
        if not any(a.startswith("--bind") for a in args):
            cmd += ["--bind", "tcp://127.0.0.1:0"]
        self.process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=cwd,
            env=env,
        )
        self.lines: list[str] = []
        self._new_lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        assert self.process.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.process.stdout, selectors.EVENT_READ)
        if not sel.select(JOIN_TIMEOUT):
            self.kill()
            raise AssertionError(f"server{where} did not print its ready line")
        ready = self.process.stdout.readline()
        sel.close()
        match = re.match(r"batchup-server ready on (\S+)", ready)
        if not match:
            self.process.wait(JOIN_TIMEOUT)
            self._reader.join(JOIN_TIMEOUT)
            raise AssertionError(f"server failed to start{where}: {ready!r}\n" + "".join(self.lines))
        self.endpoint = match.group(1)
        self.pid = self.process.pid

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            self._new_lines.put(line)

    def wait_for_log(self, pattern: str, timeout: float = JOIN_TIMEOUT) -> str:
        """Block until a log line matches ``pattern`` (regex); returns it."""
        for line in list(self.lines):
            if re.search(pattern, line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no log line matching {pattern!r}; log:\n" + "".join(self.lines))
            try:
                line = self._new_lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if re.search(pattern, line):
                return line

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server and wait for it; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(JOIN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGUSR1)  # the server prints its threads' stacks
            try:
                self.process.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
            self.kill()
            tail = "".join(self.lines[-80:])
            raise AssertionError(
                f"server did not stop within the timeout; its stderr ends:\n{tail}"
            ) from None
        self._close_pipes()
        return code

    def _close_pipes(self) -> None:
        self._reader.join(JOIN_TIMEOUT)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()

    def kill(self, sweep: bool = True) -> None:
        """SIGKILL (no cleanup runs); ``sweep`` then removes its folders as a next start would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(JOIN_TIMEOUT)
        self._close_pipes()
        if sweep:
            for root in ("/dev/shm", tempfile.gettempdir()):
                sweep_stale(root)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def write_train_source(folder: Any, X: Any, y: Any, server_toml: str = "") -> str:
    """Save ``X`` and ``y`` as ``.npy`` files in ``folder`` and write ``s.toml`` serving them
    as the source ``train`` (after the ``[server]`` lines ``server_toml``); its path."""
    import numpy as np

    folder = os.fspath(folder)
    paths = {name: os.path.join(folder, f"{name}.npy") for name in ("X", "y")}
    np.save(paths["X"], X)
    np.save(paths["y"], y)
    config = os.path.join(folder, "s.toml")
    with open(config, "w") as f:
        f.write(server_toml + f'[sources.train]\nnpy = {{ X = "{paths["X"]}", y = "{paths["y"]}" }}\n')
    return config
