"""CurveZMQ: keys from ``batchup-server keygen``, authenticated and encrypted sockets, typed
errors for refused keys, secure-by-default binds, and client code only for authenticated
clients beyond loopback. Real servers on random ports, real keys."""

from __future__ import annotations

import os
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import batchup.data_source as bds
import numpy as np
import pytest
import zmq
import zmq.auth

import batchup_client
import batchup_protocol as proto
from batchup_server.demo import make_demo_arrays
from tests.servers import RunningServer

pytestmark = pytest.mark.integration

REFUSAL_S = 6.0  #: a refused client must hear so within this


def _keygen(name: str, folder: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchup_server", "keygen", name, "--dir", folder, *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _non_loopback_ipv4() -> str | None:
    """An address of this machine that is not loopback (the route to a documentation-range
    address; nothing is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("198.51.100.1", 9))
            ip = str(s.getsockname()[0])
    except OSError:
        return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


NON_LOOPBACK = _non_loopback_ipv4()
needs_non_loopback = pytest.mark.skipif(NON_LOOPBACK is None, reason="no non-loopback IPv4 address")


class Keys:
    """A server key pair, an authorised client (alice) and an unlisted one (bob)."""

    def __init__(self, root: str):
        for name, folder in (("server", root), ("alice", f"{root}/alice"), ("bob", f"{root}/bob")):
            done = _keygen(name, folder)
            assert done.returncode == 0, done.stderr
        os.makedirs(f"{root}/clients")
        os.link(f"{root}/alice/alice.key", f"{root}/clients/alice.key")
        self.server_public = f"{root}/server.key"
        self.server_secret = f"{root}/server.key_secret"
        self.clients = f"{root}/clients"
        self.alice = f"{root}/alice/alice.key_secret"
        self.bob = f"{root}/bob/bob.key_secret"

    def server_args(self) -> tuple[str, ...]:
        return ("--curve-secret-key", self.server_secret, "--curve-clients", self.clients)

    def good(self) -> dict[str, str]:
        return {"server_key": self.server_public, "client_key": self.alice}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(str(tmp_path_factory.mktemp("curve")))


def _start(*args: str) -> RunningServer:
    return RunningServer("--workers", "2", "--log-level", "debug", *args)


def _stop(server: RunningServer) -> None:
    code = server.stop()
    assert code == 0, "".join(server.lines)


@pytest.fixture
def curve_server(keys: Keys) -> Iterator[RunningServer]:
    server = _start("--bind", "tcp://127.0.0.1:0", *keys.server_args())
    yield server
    _stop(server)


HOSTS = ["127.0.0.1", pytest.param(NON_LOOPBACK or "none", marks=needs_non_loopback, id="non-loopback")]


# ---------------------------------------------------------------------- keygen
def test_keygen_writes_a_loadable_pair_with_a_private_secret(tmp_path: Any) -> None:
    done = _keygen("node1", str(tmp_path / "k"))
    assert done.returncode == 0, done.stderr
    public, secret = tmp_path / "k" / "node1.key", tmp_path / "k" / "node1.key_secret"
    assert str(public) in done.stdout and str(secret) in done.stdout
    assert "--curve-secret-key" in done.stdout and "BATCHUP_CLIENT_KEY" in done.stdout
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    pub, none = zmq.auth.load_certificate(str(public))
    pub2, sec = zmq.auth.load_certificate(str(secret))
    assert none is None and pub == pub2 and len(pub) == 40 and sec is not None and len(sec) == 40
    again = _keygen("node1", str(tmp_path / "k"))
    assert again.returncode == 2 and "--force" in again.stderr  # never overwrites a key silently
    assert zmq.auth.load_certificate(str(secret)) == (pub2, sec)
    assert _keygen("node1", str(tmp_path / "k"), "--force").returncode == 0
    assert zmq.auth.load_certificate(str(secret))[0] != pub


# ---------------------------------------------------------------------- authorised clients
@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("share_memory", [None, False], ids=["default", "socket"])
def test_authorised_client_streams_batchups_batches(keys: Keys, host: str, share_memory: Any) -> None:
    server = _start("--bind", f"tcp://{host}:0", *keys.server_args())
    try:
        assert server.endpoint.startswith(f"tcp://{host}:")
        X, y = make_demo_arrays()
        with batchup_client.connect(server.endpoint, share_memory=share_memory, **keys.good()) as client:
            assert client.info()["security"] == "CURVE"
            assert client.mechanisms() == {"control": zmq.CURVE, "data": zmq.CURVE, "heartbeat": zmq.CURVE}
            remote = client.source("demo").batch_iterator(batch_size=500, shuffle=np.random.RandomState(3))
            local = bds.ArrayDataSource([X, y]).batch_iterator(
                batch_size=500, shuffle=np.random.RandomState(3)
            )
            n = 0
            for (rX, ry), (lX, ly) in zip(remote, local, strict=True):
                np.testing.assert_array_equal(rX, lX)
                np.testing.assert_array_equal(ry, ly)
                n += 1
            assert n == 24
            idx = np.array([5, 0, 11999])
            gX, gy = client.source("demo").samples_by_indices(idx)  # a worker answers on the data socket
            np.testing.assert_array_equal(gX, X[idx])
            np.testing.assert_array_equal(gy, y[idx])
        server.wait_for_log("CURVE: server public key")
    finally:
        _stop(server)


def test_keys_from_the_environment(keys: Keys, curve_server: RunningServer, monkeypatch: Any) -> None:
    monkeypatch.setenv("BATCHUP_SERVER_KEY", keys.server_public)
    monkeypatch.setenv("BATCHUP_CLIENT_KEY", keys.alice)
    with batchup_client.connect(curve_server.endpoint) as client:
        assert client.mechanisms()["control"] == zmq.CURVE
        assert len(list(client.source("demo").batch_iterator(batch_size=6000))) == 2


def test_ping_with_keys(keys: Keys, curve_server: RunningServer) -> None:
    def ping(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "batchup_server", "ping", curve_server.endpoint, *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHUP_")}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)

    ok = ping("--server-key", keys.server_public, "--client-key", keys.alice)
    assert ok.returncode == 0, ok.stderr
    refused = ping("--timeout", "5")
    assert refused.returncode == 1 and "requires CURVE" in refused.stderr


# ---------------------------------------------------------------------- refused clients
def _refused(endpoint: str, **kwargs: Any) -> batchup_client.AuthenticationError:
    start = time.monotonic()
    with pytest.raises(batchup_client.AuthenticationError) as info:
        batchup_client.connect(endpoint, timeout=30, **kwargs)
    elapsed = time.monotonic() - start
    assert elapsed < REFUSAL_S, f"took {elapsed:.1f}s to refuse"
    assert endpoint in str(info.value)
    return info.value


def test_refused_keys_raise_authentication_error_and_others_keep_being_served(
    keys: Keys, curve_server: RunningServer, monkeypatch: Any
) -> None:
    monkeypatch.delenv("BATCHUP_SERVER_KEY", raising=False)
    monkeypatch.delenv("BATCHUP_CLIENT_KEY", raising=False)
    endpoint = curve_server.endpoint
    with batchup_client.connect(endpoint, **keys.good()) as good:
        it = good.source("demo").batch_iterator(batch_size=1000)
        first = next(it)
        unlisted = _refused(endpoint, server_key=keys.server_public, client_key=keys.bob)
        assert "not among the server's authorised client keys" in str(unlisted)
        assert isinstance(unlisted, batchup_client.BatchupError)
        wrong = _refused(endpoint, server_key=f"{os.path.dirname(keys.bob)}/bob.key", client_key=keys.alice)
        assert "server_key is not the public key" in str(wrong)
        plain = _refused(endpoint)
        assert "requires CURVE" in str(plain) and "BATCHUP_SERVER_KEY" in str(plain)
        assert len([first, *it]) == 12  # the good client's stream never noticed
    curve_server.wait_for_log("refused a client whose CURVE public key is not in")
    # a plain client's refusal reaches the server's log only when the server sees the
    # mechanism mismatch before the client hangs up (a race); the client's error above is
    # what must never be missed
    with batchup_client.connect(endpoint, **keys.good()) as again:
        assert len(list(again.source("demo").batch_iterator(batch_size=6000))) == 2


def test_curve_client_to_a_plain_server_fails_clearly(keys: Keys, server: RunningServer) -> None:
    error = _refused(server.endpoint, **keys.good())
    assert "does not use CURVE" in str(error)


def test_half_a_key_pair_is_a_clear_value_error(keys: Keys, curve_server: RunningServer) -> None:
    with pytest.raises(ValueError, match="both server_key"):
        batchup_client.connect(curve_server.endpoint, server_key=keys.server_public)
    with pytest.raises(ValueError, match="only a public key"):
        batchup_client.connect(
            curve_server.endpoint, server_key=keys.server_public, client_key=keys.server_public
        )


# ---------------------------------------------------------------------- raw sockets
def _hello(sock: zmq.Socket[Any], client_id: bytes, data_endpoint: str) -> None:
    sock.send_multipart(proto.encode(proto.Hello(list(proto.PROTOCOL_VERSION), client_id, data_endpoint)))


def _curve_client(sock: zmq.Socket[Any], server_key: str, client_secret: str) -> None:
    sock.curve_serverkey = zmq.auth.load_certificate(server_key)[0]
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(client_secret)


def test_a_plain_dealer_gets_no_welcome(curve_server: RunningServer) -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        client_id = secrets.token_bytes(16)
        sock.routing_id = client_id
        sock.connect(curve_server.endpoint)
        _hello(sock, client_id, "tcp://127.0.0.1:1")
        assert sock.poll(2000) == 0  # ZeroMQ never completes the handshake: nothing comes back
        assert sock.getsockopt(zmq.MECHANISM) == zmq.NULL
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("data_key", ["alice", "bob", "plain"])
def test_the_data_path_checks_keys_too(keys: Keys, curve_server: RunningServer, data_key: str) -> None:
    """The workers' PUSH to a client's data PULL is a CURVE server with its own ZAP check:
    a data endpoint named in an authorised client's Hello receives batches only when the
    PULL behind it holds an authorised key (and the server's public key)."""
    ctx = zmq.Context()
    try:
        control = ctx.socket(zmq.DEALER)
        control.linger = 0
        client_id = secrets.token_bytes(16)
        control.routing_id = client_id
        _curve_client(control, keys.server_public, keys.alice)
        control.connect(curve_server.endpoint)
        data = ctx.socket(zmq.PULL)
        data.linger = 0
        if data_key != "plain":
            _curve_client(data, keys.server_public, keys.alice if data_key == "alice" else keys.bob)
        port = data.bind_to_random_port("tcp://127.0.0.1")
        _hello(control, client_id, f"tcp://127.0.0.1:{port}")
        assert control.poll(10000)
        assert isinstance(proto.decode(control.recv_multipart())[0], proto.Welcome)
        gather = proto.Gather(1, {"name": "demo"}, None)
        control.send_multipart(proto.encode(gather, [np.arange(4, dtype=np.int64)]))
        if data_key == "alice":
            assert data.poll(10000)
            msg, arrays = proto.decode(data.recv_multipart())
            assert isinstance(msg, proto.GatherResult)
            np.testing.assert_array_equal(arrays[0], make_demo_arrays()[0][:4])
        else:
            assert data.poll(2000) == 0  # the worker's handshake to this PULL failed: nothing arrives
    finally:
        ctx.destroy(linger=0)


# ---------------------------------------------------------------------- secure by default
@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:0", "tcp://*:0"])
def test_a_public_bind_without_keys_refuses_to_start(bind: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "batchup_server", "--bind", bind],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    for text in ("batchup-server keygen server", "--curve-secret-key", "--curve-clients", "--insecure", bind):
        assert text in done.stderr, text
    assert "ready" not in done.stdout


def test_a_public_bind_with_insecure_starts_and_warns() -> None:
    server = _start("--bind", "tcp://0.0.0.0:0", "--insecure")
    try:
        server.wait_for_log("WARNING INSECURE: serving tcp://0.0.0.0:0 without CURVE")
        port = server.endpoint.rsplit(":", 1)[1]
        with batchup_client.connect(f"tcp://127.0.0.1:{port}") as client:
            assert client.info()["security"] == "none"
            assert client.mechanisms()["control"] == zmq.NULL
    finally:
        _stop(server)


def test_loopback_without_keys_starts_as_before(server: RunningServer) -> None:
    server.wait_for_log("serving 1 source")
    assert not any("INSECURE" in line or "CURVE" in line for line in server.lines)


def test_half_the_server_keys_is_a_config_error(keys: Keys) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "batchup_server", "--curve-secret-key", keys.server_secret],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--curve-clients" in done.stderr
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchup_server",
            "--curve-secret-key",
            keys.server_public,
            "--curve-clients",
            keys.clients,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "only a public key" in done.stderr


# ---------------------------------------------------------------------- client code
def _double(X: Any, y: Any) -> Any:
    return X * 2, y


@needs_non_loopback
def test_anonymous_clients_beyond_loopback_are_never_trusted_with_code() -> None:
    server = _start("--bind", f"tcp://{NON_LOOPBACK}:0", "--insecure", "--trust-client-code")
    try:
        server.wait_for_log("--trust-client-code is ignored")
        with batchup_client.connect(server.endpoint) as client:
            assert not client.trusts_code
            with pytest.raises(batchup_client.UnauthorizedError) as info:
                client.register_code(_double)
            assert "without CURVE authentication" in str(info.value)
            with pytest.raises(batchup_client.UnauthorizedError):
                next(client.source("demo").map(_double, where="server").batch_iterator(4))
    finally:
        _stop(server)


@needs_non_loopback
def test_authorised_clients_beyond_loopback_are_trusted_with_code(keys: Keys) -> None:
    server = _start("--bind", f"tcp://{NON_LOOPBACK}:0", "--trust-client-code", *keys.server_args())
    try:
        with batchup_client.connect(server.endpoint, **keys.good()) as client:
            assert client.trusts_code
            (X2, y2) = next(client.source("demo").map(_double, where="server").batch_iterator(4))
            X, y = make_demo_arrays()
            np.testing.assert_array_equal(X2, X[:4] * 2)
            np.testing.assert_array_equal(y2, y[:4])
    finally:
        _stop(server)


def test_a_client_key_added_to_the_folder_is_served_without_a_restart(keys: Keys, tmp_path: Any) -> None:
    clients = tmp_path / "clients"
    clients.mkdir()
    os.link(f"{keys.clients}/alice.key", clients / "alice.key")
    server = _start("--curve-secret-key", keys.server_secret, "--curve-clients", str(clients))
    try:
        bob = {"server_key": keys.server_public, "client_key": keys.bob}
        _refused(server.endpoint, **bob)
        os.link(f"{os.path.dirname(keys.bob)}/bob.key", clients / "bob.key")
        server.wait_for_log(r"CURVE: client keys changed; 2 authorised key\(s\)")
        with batchup_client.connect(server.endpoint, share_memory=False, **bob) as client:
            assert len(list(client.source("demo").batch_iterator(batch_size=6000))) == 2
        (clients / "bob.key").unlink()
        server.wait_for_log(r"CURVE: client keys changed; 1 authorised key\(s\)")
        _refused(server.endpoint, **bob)
    finally:
        _stop(server)


# ---------------------------------------------------------------------- several servers
def test_servers_with_key_pairs_of_their_own_take_one_server_key_each(
    keys: Keys, curve_server: RunningServer, tmp_path: Any, monkeypatch: Any
) -> None:
    """connect([a, b], server_key=[ka, kb]) (or ``$BATCHUP_SERVER_KEY=ka,kb``) authenticates
    each server with its own key and streams batchup's batches from both; keys in the wrong
    order or of the wrong count are refused with what is wrong."""
    monkeypatch.delenv("BATCHUP_SERVER_KEY", raising=False)
    monkeypatch.delenv("BATCHUP_CLIENT_KEY", raising=False)
    assert _keygen("other", str(tmp_path)).returncode == 0
    other = _start("--curve-secret-key", f"{tmp_path}/other.key_secret", "--curve-clients", keys.clients)
    try:
        endpoints = [curve_server.endpoint, other.endpoint]
        own_keys = [keys.server_public, f"{tmp_path}/other.key"]
        X, y = make_demo_arrays()
        want = list(bds.ArrayDataSource([X, y]).batch_iterator(1000, shuffle=np.random.RandomState(5)))
        with batchup_client.connect(endpoints, server_key=own_keys, client_key=keys.alice) as client:
            got = list(client.source("demo").batch_iterator(1000, shuffle=np.random.RandomState(5)))
            assert client.info()["servers"] == dict.fromkeys(endpoints, True)
        assert len(got) == len(want)
        for (gx, gy), (wx, wy) in zip(got, want, strict=True):
            np.testing.assert_array_equal(gx, wx)
            np.testing.assert_array_equal(gy, wy)

        monkeypatch.setenv("BATCHUP_SERVER_KEY", ",".join(own_keys))
        monkeypatch.setenv("BATCHUP_CLIENT_KEY", keys.alice)
        with batchup_client.connect(",".join(endpoints)) as client:
            assert client.source("demo").num_samples() == len(X)
            assert all(client.info()["servers"].values())
        monkeypatch.delenv("BATCHUP_SERVER_KEY")
        monkeypatch.delenv("BATCHUP_CLIENT_KEY")

        with pytest.raises(batchup_client.ConnectionLost) as info:  # each server given the other's key
            batchup_client.connect(endpoints, server_key=own_keys[::-1], client_key=keys.alice, timeout=30)
        assert str(info.value).count("server_key is not the public key") == 2
        with pytest.raises(ValueError, match="3 key files for 2 addresses"):
            batchup_client.connect(endpoints, server_key=[*own_keys, own_keys[0]], client_key=keys.alice)
    finally:
        _stop(other)


# ---------------------------------------------------------------------- health endpoint
def test_the_health_endpoint_answers_ping_without_keys_and_serves_nothing(keys: Keys, tmp_path: Any) -> None:
    health = f"ipc://{tmp_path}/health"
    server = _start("--bind", "tcp://127.0.0.1:0", *keys.server_args(), "--health-bind", health)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHUP_")}

    def ping(address: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "batchup_server", "ping", address, "--timeout", "5"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)

    try:
        ok = ping(health)
        assert ok.returncode == 0 and "answered" in ok.stdout, ok.stderr
        assert ping(server.endpoint).returncode == 1  # the keyed endpoint still wants keys
        with batchup_client.connect(health, timeout=5) as client:
            assert "demo" in client.sources
            with pytest.raises(batchup_client.UnauthorizedError, match="health endpoint"):
                client.source("demo").num_samples()
        with batchup_client.connect(server.endpoint, **keys.good()) as client:  # others unaffected
            assert client.source("demo").num_samples() == 12000
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("health", ["tcp://0.0.0.0:5556", "tcp://10.1.2.3:5556"])
def test_a_health_endpoint_beyond_loopback_is_a_config_error(keys: Keys, health: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "batchup_server", *keys.server_args(), "--health-bind", health],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "loopback or ipc" in done.stderr and health in done.stderr
    assert "ready" not in done.stdout
