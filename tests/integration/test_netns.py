"""Across a real network: servers and a trainer on hosts that are Linux network namespaces
joined by veth pairs to a bridge (``tests/netns.py``), bound to their own non-loopback
addresses, with CurveZMQ keys from ``batchup-server keygen`` as deployed (and once with
``--insecure``). One host is cut off mid-stream by taking its switch port down: no FIN, no
RST, TCP keeps the connection, so only heartbeats can tell. Needs root; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import batchup.data_source as bds
import numpy as np
import pytest

from tests import netns
from tests.netns import NetnsUnavailable, Network, NsProcess, NsServer
from tests.servers import worker_pids, write_train_source

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 900
X = np.random.RandomState(0).normal(size=(N, 6)).astype(np.float32)
Y = (np.arange(N) % 10).astype(np.int64)
SERVER_TIMEOUT = 2.0  #: the trainer's: a server silent this long is lost
CLIENT_TIMEOUT = 3.0  #: the servers': a client silent this long has its streams reclaimed
PORT = 5555  #: every host has its own port space

PLUGIN = """
import os
import numpy as np
from batchup_server.plugins import transform

@transform("tag")
def tag(*batch):  # says which process made the batch
    return (*batch, np.full(len(batch[0]), os.getpid()))
"""


def _make_network(hosts: list[str]) -> Network:
    try:
        return Network(hosts)
    except NetnsUnavailable as exc:
        pytest.skip(f"no network namespaces here: {exc}")


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    """Hosts a and b (servers fed to one trainer), solo (a server alone), trainer."""
    network = _make_network(["a", "b", "solo", "trainer"])
    try:
        yield network
    finally:
        network.close()
    assert network.leftovers() == []


@pytest.fixture(autouse=True)
def _links_up(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "net" in request.fixturenames:
        request.getfixturevalue("net").restore()  # a test that failed mid-cut leaves no host cut off


class Setup:
    """Data, plugin, config and keys in one folder every host sees (one filesystem)."""

    def __init__(self, folder: Any):
        self.folder = str(folder)
        (folder / "bu_netns_plugin.py").write_text(PLUGIN)
        self.config = write_train_source(folder, X, Y, '[server]\nplugins = ["bu_netns_plugin"]\n')
        keys = folder / "keys"
        for name, where in (("server", keys), ("trainer", keys / "trainer")):
            done = subprocess.run(
                [sys.executable, "-m", "batchup_server", "keygen", name, "--dir", str(where)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
        os.makedirs(keys / "clients")
        os.link(keys / "trainer" / "trainer.key", keys / "clients" / "trainer.key")
        self.server_secret = str(keys / "server.key_secret")
        self.server_public = str(keys / "server.key")
        self.clients = str(keys / "clients")
        self.trainer_secret = str(keys / "trainer" / "trainer.key_secret")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHUP_")}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (self.folder, ROOT, os.environ.get("PYTHONPATH", "")) if p
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("netns"))


def _server(net: Network, setup: Setup, host: str, secure: bool = True) -> NsServer:
    keys = ["--curve-secret-key", setup.server_secret, "--curve-clients", setup.clients] if secure else []
    return NsServer(
        net,
        host,
        *("--config", setup.config, "--workers", "1", "--bind", f"tcp://{net.addresses[host]}:{PORT}"),
        *("--heartbeat-interval", "0.5", "--client-timeout", str(CLIENT_TIMEOUT), "--log-level", "info"),
        *([*keys] if secure else ["--insecure"]),
        env=setup.env,
    )


def _stop(*servers: NsServer) -> None:
    codes = [s.stop() if s.process.poll() is None else s.process.returncode for s in servers]
    for s, code in zip(servers, codes):
        assert code == 0, "".join(s.lines)


def _trainer(
    net: Network, setup: Setup, servers: list[NsServer], secure: bool = True, **spec: Any
) -> NsProcess:
    spec = {
        "addresses": [s.endpoint for s in servers],
        "server_timeout": SERVER_TIMEOUT,
        "source": "train",
        "batch_size": 10,
        "seed": 7,
        "sleep": 0.02,
        "tag": True,
        **spec,
    }
    if secure:
        spec.update(server_key=setup.server_public, client_key=setup.trainer_secret)
    args = [sys.executable, "-m", "tests.netns", "trainer", json.dumps(spec)]
    return NsProcess(net, "trainer", args, env=setup.env)


def _reference(batch_size: int, seed: int) -> list[Any]:
    ds = bds.ArrayDataSource([X, Y], include_indices=True)
    return list(ds.batch_iterator(batch_size, shuffle=np.random.RandomState(seed)))


def _assert_same_as_batchup(out: str, batch_size: int, seed: int) -> np.ndarray:
    """The trainer's batches (saved in ``out``) are batchup's, array for array and dtype for
    dtype; returns which worker pid made each batch."""
    want = _reference(batch_size, seed)
    with np.load(out) as got:
        assert got["lengths"].tolist() == [len(w[0]) for w in want]
        for j in range(3):
            expected = np.concatenate([w[j] for w in want])
            assert got[f"f{j}"].dtype == expected.dtype
            np.testing.assert_array_equal(got[f"f{j}"], expected)
        return np.array(got["made_by"])


# ---------------------------------------------------------------------- the network itself
def test_the_network_is_real_and_leaves_nothing_behind() -> None:
    """Hosts reach each other over the bridge (and not once their port is down); every
    namespace and link is gone after the block, also when it is left by an exception."""
    with _make_network(["h1", "h2"]) as net:
        prefix, short = net.prefix, net.short
        assert len(net.leftovers()) == 3  # switch + 2 hosts, nothing in the root namespace
        assert not [n for n in netns.root_links() if n.startswith(short)]
        assert net.reaches("h1", "h2")
        net.cut("h2")
        assert not net.reaches("h1", "h2")
        net.restore("h2")
        assert net.reaches("h2", "h1")
    assert netns.leftovers(prefix, short) == []

    with pytest.raises(RuntimeError, match="boom"):
        with _make_network(["h1"]) as net:
            prefix, short = net.prefix, net.short
            sleeper = NsProcess(net, "h1", ["sleep", "300"])  # still running when we fail
            raise RuntimeError("boom")
    assert netns.leftovers(prefix, short) == []
    if not netns._live:  # the SIGTERM/SIGHUP handlers are installed only while a network lives
        assert signal.getsignal(signal.SIGTERM) is not netns._on_signal
    assert sleeper.process.wait(10) != 0  # killed with its namespace, not orphaned
    sleeper.wait()


def test_a_namespace_left_by_a_killed_test_process_is_swept(tmp_path: Any) -> None:
    """A test process killed with SIGKILL cannot clean up: the next network removes what it left."""
    code = (
        "import os, sys; from tests.netns import Network, NetnsUnavailable\n"
        "try:\n    net = Network(['h1'])\nexcept NetnsUnavailable as exc:\n    sys.exit(f'skip: {exc}')\n"
        "print(net.prefix, net.short, flush=True)\nos.kill(os.getpid(), 9)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    if done.stderr.startswith("skip: "):
        pytest.skip(f"no network namespaces here: {done.stderr[6:].strip()}")
    assert done.returncode == -9, done.stderr
    prefix, short = done.stdout.split()
    assert len(netns.leftovers(prefix, short)) == 2  # SIGKILL: nothing could clean up
    with _make_network(["h1"]):
        assert netns.leftovers(prefix, short) == []  # swept by the next network

    code = code.replace("os.kill(os.getpid(), 9)", "os.kill(os.getpid(), 15); import time; time.sleep(30)")  # noqa: sleep-ok (the child waits to die)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    prefix, short = done.stdout.split()
    assert done.returncode == -15 and netns.leftovers(prefix, short) == []  # SIGTERM cleans up


# ---------------------------------------------------------------------- servers and a trainer
@pytest.mark.parametrize("secure", [True, False], ids=["curve", "insecure"])
def test_two_server_hosts_feed_a_trainer_host(
    net: Network, setup: Setup, tmp_path: Any, secure: bool
) -> None:
    a, b = _server(net, setup, "a", secure), _server(net, setup, "b", secure)
    try:
        assert a.endpoint == f"tcp://{net.addresses['a']}:{PORT}"
        out = str(tmp_path / "got.npz")
        trainer = _trainer(net, setup, [a, b], secure=secure, out=out, sleep=0.005)
        try:
            connected = trainer.expect("connected")
            assert connected["info"]["servers"] == {a.endpoint: True, b.endpoint: True}
            done = trainer.expect("done", "error")
            assert done["event"] == "done", done
            assert trainer.wait() == 0, "".join(trainer.stderr)
        finally:
            trainer.kill()
        made_by = _assert_same_as_batchup(out, 10, 7)
        by_a = np.isin(made_by, worker_pids(a.pid)).sum()
        by_b = np.isin(made_by, worker_pids(b.pid)).sum()
        assert by_a > 0 and by_b > 0 and by_a + by_b == len(made_by) == N // 10, (by_a, by_b)
        trainer_ip = net.addresses["trainer"]
        for s in (a, b):  # the trainer came from its own host's address, with its key or none
            line = s.wait_for_log(r"client \w+ connected")
            assert f"tcp://{trainer_ip}:" in line, line
    finally:
        _stop(a, b)


def test_a_bind_beyond_loopback_needs_keys_or_insecure(net: Network, setup: Setup) -> None:
    cmd = [*net.exec_prefix("a"), sys.executable, "-m", "batchup_server", "--config", setup.config]
    done = subprocess.run(
        [*cmd, "--bind", f"tcp://{net.addresses['a']}:{PORT}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=setup.env,
    )
    assert done.returncode == 2 and "--insecure" in done.stderr, done.stderr


def test_a_server_host_cut_off_mid_stream_costs_a_stall_not_a_batch(
    net: Network, setup: Setup, tmp_path: Any
) -> None:
    a, b = _server(net, setup, "a"), _server(net, setup, "b")
    try:
        out = str(tmp_path / "got.npz")
        trainer = _trainer(net, setup, [a, b], out=out, sleep=0.02)
        try:
            trainer.expect("connected")
            cut_after = 20
            trainer_event = trainer.expect("batch")
            while trainer_event["i"] < cut_after:
                trainer_event = trainer.expect("batch")
            net.cut("b")
            cut_at = time.monotonic()
            done = trainer.expect("done", "error", timeout=60)
            assert done["event"] == "done", done
            elapsed = done["received"] - cut_at
            assert trainer.wait() == 0, "".join(trainer.stderr)
        finally:
            trainer.kill()
        made_by = _assert_same_as_batchup(out, 10, 7)  # every batch once, in order
        b_workers = worker_pids(b.pid)
        assert done["servers"] == {a.endpoint: True, b.endpoint: False}  # the loss was noticed
        # b's batches asked after the cut stall the trainer until b misses its heartbeats
        # (nothing else tells: no FIN, no RST); then a makes them.
        assert 0.5 < done["max_gap"] < SERVER_TIMEOUT + 4.0, done
        assert elapsed < 90 * 0.02 + SERVER_TIMEOUT + 6.0, elapsed
        assert np.isin(made_by[: cut_after + 1], b_workers).any()  # b served before the cut
        # Past what b could have sent before the cut (the trainer's credit: 32 batches ahead;
        # a margin for the trainer being a few batches further than we read when we cut).
        late = made_by[cut_after + 32 + 16 :]
        assert len(late) and not np.isin(late, b_workers).any()
        print(f"max gap {done['max_gap']:.2f}s; finished {elapsed:.2f}s after the cut")
    finally:
        net.restore("b")
        _stop(a, b)


def test_a_lone_server_cut_off_gives_connection_lost_and_reclaims_the_stream(
    net: Network, setup: Setup, tmp_path: Any
) -> None:
    solo = _server(net, setup, "solo")
    try:
        trainer = _trainer(net, setup, [solo], out=str(tmp_path / "got.npz"), sleep=0.03)
        try:
            trainer.expect("connected")
            while trainer.expect("batch")["i"] < 10:
                pass
            net.cut("solo")
            cut_at = time.monotonic()
            error = trainer.expect("done", "error", timeout=60)
            assert error["event"] == "error", error
            assert error["type"] == "ConnectionLost", error
            assert "heartbeats" in error["message"], error
            detected = error["received"] - cut_at
            assert detected < SERVER_TIMEOUT + 4.0, detected  # a clear error, not a hang
            assert trainer.wait() == 0, "".join(trainer.stderr)
        finally:
            trainer.kill()
        # The kernel noticed nothing: the server's end of the trainer's connections is still
        # established (only the heartbeats tell the server, after client_timeout).
        established = subprocess.run(
            [*net.exec_prefix("solo"), "ss", "-tnH", "state", "established", "dst", net.addresses["trainer"]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert established.stdout.strip(), established.stderr
        # The server hears nothing from the trainer either: once silent for client_timeout,
        # its stream is reclaimed.
        line = solo.wait_for_log(r"silent for more than", timeout=CLIENT_TIMEOUT + 10)
        assert f"silent for more than {CLIENT_TIMEOUT:g}s: reclaiming 1 stream(s)" in line, line
        # With the link back, the host serves again (a new, authenticated client from the trainer's host).
        net.restore("solo")
        ping = [
            *net.exec_prefix("trainer"),
            *(sys.executable, "-m", "batchup_server", "ping", solo.endpoint, "--timeout", "10"),
            *("--server-key", setup.server_public, "--client-key", setup.trainer_secret),
        ]
        done = subprocess.run(ping, capture_output=True, text=True, timeout=60, env=setup.env)
        assert done.returncode == 0, done.stderr
        print(f"ConnectionLost {detected:.2f}s after the cut")
    finally:
        net.restore("solo")
        _stop(solo)
