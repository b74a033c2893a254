"""A small real network for tests: one Linux network namespace per "host", joined by veth
pairs to a bridge in a namespace of its own (the "switch"), so that servers and trainers
talk over real, non-loopback TCP and a host can be cut off by taking its switch port down.

Needs root (``ip netns``). Nothing is made in the root namespace: the bridge and the switch
ends of the veths live in the switch namespace, each host end (``eth0``) in its host's
namespace, so host rules (iptables, br_netfilter) play no part and nothing can collide
with the machine's own interfaces. Everything made is removed on every exit path:
``Network`` is a context manager (``try``/``finally``), live networks are also removed
``atexit`` and on SIGTERM/SIGHUP, and a new network first sweeps the namespaces of test
processes that died without cleaning up (SIGKILL), recognised by the pid in their name.

Also here: :class:`NsServer` (a ``batchup-server`` started inside a host's namespace),
:class:`NsProcess` (a JSON-lines program inside a namespace) and the trainer program the
tests run on the trainer's host (``python -m tests.netns trainer SPEC``).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from batchup_protocol.host import sweep_stale as sweep_stale_folders
from tests.servers import JOIN_TIMEOUT, RunningServer, pid_alive

IP_TIMEOUT = 20.0
TERM_GRACE_S = 3.0  #: processes left in a namespace being deleted get this long after SIGTERM
NS_RE = re.compile(r"^bu(\d+)x(\d+)-")  #: our namespaces: bu<pid>x<n>-<host>


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no ``ip``, or no permission)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (iproute2); raises with its stderr when ``check`` and it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def netns_names() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    done = ip("netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def root_links() -> list[str]:
    """Interface names in the root namespace (``ip -o link``), without any ``@peer`` suffix."""
    done = ip("-o", "link", "show")
    return [line.split(":")[1].strip().split("@")[0] for line in done.stdout.splitlines() if ":" in line]


def leftovers(prefix: str, short: str) -> list[str]:
    """What a network of these names left behind: its namespaces and root-namespace links."""
    return [n for n in netns_names() if n.startswith(prefix)] + [
        f"link {n}" for n in root_links() if n.startswith(short)
    ]


def _end_processes(pids: list[int]) -> None:
    """SIGTERM (servers then clean up after themselves), SIGKILL what still runs after a
    grace period, then remove the folders of any that could not clean up."""
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, JOIN_TIMEOUT)):
        pids = [p for p in pids if pid_alive(p)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)  # noqa: sleep-ok (waiting for signalled processes to exit)
    if pids:
        for root in ("/dev/shm", tempfile.gettempdir()):
            sweep_stale_folders(root)


def _delete_namespace(name: str) -> None:
    """End whatever still runs in namespace ``name`` (only processes of our tests run
    there), delete its interfaces, then the namespace."""
    pids = [int(p) for p in ip("netns", "pids", name, check=False).stdout.split() if p.isdigit()]
    _end_processes(pids)
    links = ip("-n", name, "-o", "link", "show", check=False).stdout.splitlines()
    for line in links:
        link = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if link and link != "lo":
            ip("-n", name, "link", "del", link, check=False)
    ip("netns", "del", name, check=False)


def sweep_stale() -> list[str]:
    """Delete the namespaces of test processes that are gone (killed before cleaning up)."""
    swept = []
    for name in netns_names():
        m = NS_RE.match(name)
        if m and not pid_alive(int(m.group(1))):
            _delete_namespace(name)
            swept.append(name)
    return swept


# ---------------------------------------------------------------------- cleanup on every exit
_live: dict[int, Network] = {}
_live_lock = threading.Lock()
_atexit_registered = False
_previous_handlers: dict[int, Any] = {}  #: SIGTERM/SIGHUP handlers replaced while networks live


def _cleanup_all() -> None:
    with _live_lock:
        nets = list(_live.values())
    for net in nets:
        net.close()


def _on_signal(signum: int, frame: Any) -> None:
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # die of the signal as we would have


def _install_handlers() -> None:
    """While a network lives: remove it at exit, and on SIGTERM/SIGHUP (when nothing else
    handles them) before dying of the signal."""
    global _atexit_registered
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_cleanup_all)
    if threading.current_thread() is not threading.main_thread() or _previous_handlers:
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            _previous_handlers[sig] = signal.signal(sig, _on_signal)


def _restore_handlers() -> None:
    """Once no network lives, the process's signal handlers are as they were."""
    if _live or threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in list(_previous_handlers.items()):
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, handler)
        del _previous_handlers[sig]


# ---------------------------------------------------------------------- the network
class Network:
    """A switch namespace with a bridge, and one namespace per host joined to it by a veth.

    Host *k* (1-based, in the order given) has ``eth0`` with ``10.A.B.k/24`` (A, B from the
    pid and a counter) and ``lo``, both up; its veth's other end, ``<short>p<k>``, is a port
    of the bridge ``<short>br`` in the switch. ``cut(host)`` takes that port down (the
    host's cable pulled at the switch), ``restore(host)`` brings it back.
    """

    _count = 0

    def __init__(self, hosts: list[str]):
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (ip netns add)")
        try:
            subprocess.run(["ip", "-V"], capture_output=True, timeout=IP_TIMEOUT, check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NetnsUnavailable(f"iproute2's ip command is not usable: {exc}") from exc
        sweep_stale()
        Network._count += 1
        n, pid = Network._count, os.getpid()
        self.prefix = f"bu{pid}x{n}-"  #: namespace names: <prefix>sw, <prefix><host>
        self.short = f"bu{pid % 1000}{n}"  #: interface names: <short>br, <short>p<k> (<= 15 chars)
        assert len(self.short) + 3 <= 15
        self.switch = f"{self.prefix}sw"
        self.subnet = f"10.{200 + pid % 50}.{n % 250}"
        self.hosts = {h: f"{self.prefix}{h}" for h in hosts}
        self.addresses = {h: f"{self.subnet}.{k}" for k, h in enumerate(hosts, 1)}
        self.ports = {h: f"{self.short}p{k}" for k, h in enumerate(hosts, 1)}
        self.bridge = f"{self.short}br"
        self._closed = False
        with _live_lock:
            _live[id(self)] = self
        _install_handlers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        made = ip("netns", "add", self.switch, check=False)
        if made.returncode != 0:
            raise NetnsUnavailable(f"ip netns add failed: {made.stderr.strip()}")
        sw = ("-n", self.switch)
        ip(*sw, "link", "add", self.bridge, "type", "bridge")
        ip(*sw, "link", "set", self.bridge, "up")
        for host, ns in self.hosts.items():
            ip("netns", "add", ns)
            port = self.ports[host]
            ip(*sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip(*sw, "link", "set", port, "master", self.bridge)
            ip(*sw, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, host: str) -> None:
        """Take ``host``'s switch port down: its packets go nowhere, no FIN, no RST."""
        ip("-n", self.switch, "link", "set", self.ports[host], "down")

    def restore(self, host: str | None = None) -> None:
        """Bring ``host``'s switch port (or every port) back up."""
        for h in [host] if host else list(self.hosts):
            ip("-n", self.switch, "link", "set", self.ports[h], "up")

    def exec_prefix(self, host: str) -> list[str]:
        """The command prefix that runs a program on ``host``."""
        return ["ip", "netns", "exec", self.hosts[host]]

    def reaches(self, src: str, dst: str, timeout: float = 1.0) -> bool:
        """Whether a TCP connection from ``src`` to a listener on ``dst`` succeeds in time."""
        listen = (
            "import socket; s = socket.create_server(('0.0.0.0', 0)); "
            "print(s.getsockname()[1], flush=True); s.settimeout(30); s.accept()"
        )
        server = subprocess.Popen(
            [*self.exec_prefix(dst), sys.executable, "-c", listen], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            connect = f"import socket; socket.create_connection(({self.addresses[dst]!r}, {port}), {timeout})"
            done = subprocess.run(
                [*self.exec_prefix(src), sys.executable, "-c", connect], capture_output=True, timeout=60
            )
            return done.returncode == 0
        finally:
            server.kill()
            server.wait(JOIN_TIMEOUT)
            if server.stdout is not None:
                server.stdout.close()

    def close(self) -> None:
        """Remove every namespace and link this network made. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            for ns in [*self.hosts.values(), self.switch]:
                if ns in netns_names():
                    _delete_namespace(ns)
        finally:
            with _live_lock:
                _live.pop(id(self), None)
            _restore_handlers()

    def leftovers(self) -> list[str]:
        return leftovers(self.prefix, self.short)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------- processes on hosts
class NsServer(RunningServer):
    """A ``python -m batchup_server`` subprocess on one host of a :class:`Network`; its
    stderr is collected line by line (``wait_for_log``), ``stop()`` sends SIGTERM
    (``ip netns exec`` execs the server, so the pid is the server's)."""

    def __init__(self, net: Network, host: str, *args: str, env: dict[str, str] | None = None):
        super().__init__(*args, env=env, prefix=net.exec_prefix(host), where=f" on {host}")


class NsProcess:
    """A program on one host whose stdout is JSON lines (``expect`` waits for one)."""

    def __init__(self, net: Network, host: str, args: list[str], env: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            [*net.exec_prefix(host), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "text", "line": line}
            event["received"] = time.monotonic()
            self.events.put(event)
        self.events.put({"event": "eof", "received": time.monotonic()})

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    def expect(self, *names: str, timeout: float = 30.0) -> dict[str, Any]:
        """The next event named one of ``names`` (others are skipped); fails on end of output."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = self.events.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise AssertionError(
                    f"no {names} event within {timeout}s; stderr:\n" + "".join(self.stderr)
                ) from None
            if event["event"] in names:
                return event
            if event["event"] == "eof":
                raise AssertionError(
                    f"the program ended before a {names} event (exit {self.process.wait(JOIN_TIMEOUT)}); "
                    "stderr:\n" + "".join(self.stderr)
                )

    def wait(self, timeout: float = JOIN_TIMEOUT) -> int:
        code = self.process.wait(timeout)
        for t in self._threads:
            t.join(JOIN_TIMEOUT)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()


# ---------------------------------------------------------------------- the trainer program
def trainer(spec: dict[str, Any]) -> int:
    """Stream a source from ``spec["addresses"]`` like a training loop (a short sleep per
    batch), printing JSON lines: ``connected``, ``batch`` (index, pid of the worker that
    made it when the ``tag`` transform is used), then ``done`` (batches saved to
    ``spec["out"]``; the longest wait for a batch; which servers still answer) or ``error``
    (the exception's type name and message, and how long the trainer waited for it)."""
    import numpy as np

    import batchup_client

    def say(event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, **fields}), flush=True)

    keys = {k: spec[k] for k in ("server_key", "client_key") if spec.get(k)}
    client = batchup_client.connect(
        spec["addresses"], server_timeout=spec["server_timeout"], share_memory=False, **keys
    )
    with client:
        say("connected", info={k: v for k, v in client.info().items() if k in ("servers", "batch_transport")})
        src = client.source(spec["source"], include_indices=True)
        if spec.get("tag"):
            src = src.map("tag")
        parts: list[list[Any]] = []
        made_by: list[int] = []
        gaps: list[float] = []
        last = time.monotonic()
        try:
            it = src.batch_iterator(spec["batch_size"], shuffle=np.random.RandomState(spec["seed"]))
            for i, batch in enumerate(it):
                now = time.monotonic()
                gaps.append(now - last)
                parts.append(list(batch[:3]))
                made_by.append(int(batch[3][0]) if spec.get("tag") else 0)
                say("batch", i=i, pid=made_by[-1], gap=gaps[-1])
                time.sleep(spec["sleep"])  # noqa: sleep-ok (the emulated training step)
                last = time.monotonic()
        except batchup_client.BatchupError as exc:
            say(
                "error",
                type=type(exc).__name__,
                message=str(exc),
                after=len(parts),
                waited=time.monotonic() - last,
            )
            return 0
        arrays = {f"f{j}": np.concatenate([p[j] for p in parts]) for j in range(3)}
        np.savez(
            spec["out"], lengths=np.array([len(p[0]) for p in parts]), made_by=np.array(made_by), **arrays
        )
        info = client.info()
        say("done", batches=len(parts), max_gap=max(gaps), servers=info.get("servers"))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "trainer":
        sys.exit(trainer(json.loads(sys.argv[2])))
    sys.exit("usage: python -m tests.netns trainer SPEC_JSON")
