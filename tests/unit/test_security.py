"""Security rules as pure functions: loopback endpoints, code trust, and which server key
goes with which address."""

from __future__ import annotations

import pathlib

import pytest

from batchup_client import _server_keys
from batchup_server.config import ConfigError, ServerConfig
from batchup_server.security import code_trust, is_loopback_endpoint


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:5555",
        "tcp://127.8.9.10:0",
        "tcp://localhost:5555",
        "tcp://[::1]:5555",
        "tcp://::1:5555",
        "ipc:///tmp/x.sock",
        "inproc://x",
    ],
)
def test_loopback_endpoints(endpoint: str) -> None:
    assert is_loopback_endpoint(endpoint)


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://0.0.0.0:5555",
        "tcp://*:5555",
        "tcp://[::]:5555",
        "tcp://192.0.2.2:5555",
        "tcp://eth0:5555",
        "tcp://data-host:5555",
        "tcp://128.0.0.1:5555",
        "ws://127.0.0.1:5555",
    ],
)
def test_endpoints_reachable_from_the_network(endpoint: str) -> None:
    assert not is_loopback_endpoint(endpoint)


@pytest.mark.parametrize(
    "flag, bind, curve, trusted",
    [
        (False, "tcp://127.0.0.1:1", False, False),
        (False, "tcp://0.0.0.0:1", True, False),
        (True, "tcp://127.0.0.1:1", False, True),
        (True, "ipc:///tmp/s", False, True),
        (True, "tcp://0.0.0.0:1", True, True),
        (True, "tcp://0.0.0.0:1", False, False),
        (True, "tcp://*:1", False, False),
    ],
)
def test_code_trust(flag: bool, bind: str, curve: bool, trusted: bool) -> None:
    ok, why = code_trust(flag, bind, curve)
    assert ok is trusted
    assert bool(why) is not trusted
    if flag and not trusted:
        assert "without CURVE authentication" in why and bind in why


def test_server_config_is_secure_by_default() -> None:
    with pytest.raises(ConfigError, match="batchup-server keygen server"):
        ServerConfig(bind="tcp://0.0.0.0:5555")
    assert ServerConfig(bind="tcp://0.0.0.0:5555", insecure=True).bind == "tcp://0.0.0.0:5555"
    assert ServerConfig(bind="tcp://0.0.0.0:5555", curve_secret_key="k", curve_clients="d").curve
    with pytest.raises(ConfigError, match="both"):
        ServerConfig(curve_secret_key="k")


def test_server_keys_one_for_all_or_one_per_address(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = "tcp://a:5555", "tcp://b:5555"
    assert _server_keys([a, b], None) == {a: None, b: None}
    assert _server_keys([a, b], "ka.key") == {a: "ka.key", b: "ka.key"}
    assert _server_keys([a, b], " ka.key , kb.key ") == {a: "ka.key", b: "kb.key"}
    assert _server_keys([a, b], ["ka.key", "kb.key"]) == {a: "ka.key", b: "kb.key"}
    comma = tmp_path / "server,one.key"  # a real file whose name has a comma is one key
    comma.write_text("")
    assert _server_keys([a, b], str(comma)) == {a: str(comma), b: str(comma)}
    monkeypatch.setenv("HOME", str(tmp_path))  # also when named from the home folder
    assert _server_keys([a, b], "~/server,one.key") == {a: "~/server,one.key", b: "~/server,one.key"}
    with pytest.raises(ValueError, match="3 key files for 2 addresses"):
        _server_keys([a, b], "k1,k2,k3")
    with pytest.raises(ValueError, match="given twice, with different server keys"):
        _server_keys([a, a], ["k1", "k2"])
    with pytest.raises(ValueError, match="at least one address"):
        _server_keys([], None)
