"""Datasets when things go wrong: no network, bad checksums, downloads off, a damaged
cache, an interrupted download, a full disk. Real servers, a real HTTP server."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import batchup_client
from tests import datasets_synth as synth
from tests.http_server import FileServer
from tests.integration.test_datasets import write_config
from tests.servers import RunningServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = str(tmp_path_factory.mktemp("sources"))
    os.makedirs(os.path.join(tmp, "mnist"))
    os.makedirs(os.path.join(tmp, "cifar10"))
    sources = {
        "mnist": synth.write_mnist_sources(os.path.join(tmp, "mnist"), n_train=50, n_test=10),
        "cifar10": synth.write_cifar10_tar(os.path.join(tmp, "cifar10"), n_per_batch=40, n_test=20),
    }
    with FileServer() as server:
        for name, s in sources.items():
            for filename, path in s.paths.items():
                with open(path, "rb") as f:
                    server.add(f"{name}/{filename}", f.read())
        yield server, sources


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchup_server", *args], capture_output=True, text=True, timeout=120
    )


def _config(tmp_path: Any, files: Any, **extra: Any) -> tuple[str, str]:
    server, sources = files
    home = str(tmp_path / "home")
    return write_config(str(tmp_path / "s.toml"), home, server.url("").rstrip("/"), sources, **extra), home


def test_no_network_and_no_cache_says_what_to_do(tmp_path, files) -> None:
    dead = "http://127.0.0.1:9/cifar10/"  # the discard port: nothing listens there
    config, home = _config(tmp_path, files, mirrors={"cifar10": [dead]})
    server = RunningServer("--config", config)
    try:
        with batchup_client.connect(server.endpoint) as client:
            with pytest.raises(batchup_client.DatasetUnavailableError) as info:
                client.source("cifar10", wait=60)
            text = str(info.value)
            assert "cifar10 is not cached and could not be downloaded" in text
            assert dead + "cifar-10-python.tar.gz" in text
            assert "batchup-server fetch cifar10" in text
            assert isinstance(info.value, RuntimeError)
            assert len(client.source("demo")) > 0  # the server still serves
        assert not os.path.exists(os.path.join(home, "data", "cifar10.h5"))
    finally:
        assert server.stop() == 0


def test_checksum_mismatch_is_refused_and_nothing_is_cached(tmp_path, files) -> None:
    config, home = _config(tmp_path, files, sha256={"cifar10": {"cifar-10-python.tar.gz": "0" * 64}})
    done = _cli("fetch", "cifar10", "--config", config, "--quiet")
    assert done.returncode == 1
    assert "SHA-256" in done.stderr and "cifar-10-python.tar.gz" in done.stderr
    data = os.path.join(home, "data")
    assert not os.path.exists(os.path.join(data, "cifar10.h5"))
    assert not os.path.exists(os.path.join(data, "temp", "cifar10", "cifar-10-python.tar.gz"))


def test_server_without_downloads_points_to_fetch(tmp_path, files) -> None:
    server_files, _ = files
    config, _ = _config(tmp_path, files, download=False)
    before = len(server_files.requests)
    server = RunningServer("--config", config)
    try:
        with batchup_client.connect(server.endpoint) as client:
            with pytest.raises(batchup_client.DatasetUnavailableError) as info:
                client.source("mnist")
        assert "batchup-server fetch mnist" in str(info.value) and "--download" in str(info.value)
        assert len(server_files.requests) == before  # it did not try
    finally:
        server.stop()


def test_fetch_cli_refuses_unknown_names(tmp_path) -> None:
    done = _cli("fetch", "imagenet", "--data-dir", str(tmp_path))
    assert done.returncode == 2
    assert "unknown dataset 'imagenet'" in done.stderr and "cifar10" in done.stderr


def test_interrupted_download_resumes_with_a_range_request(tmp_path, files) -> None:
    server_files, sources = files
    config, home = _config(tmp_path, files)
    tar = sources["cifar10"].paths["cifar-10-python.tar.gz"]
    with open(tar, "rb") as f:
        data = f.read()
    temp = os.path.join(home, "data", "temp", "cifar10")
    os.makedirs(temp)
    half = len(data) // 2
    with open(os.path.join(temp, "cifar-10-python.tar.gz.part"), "wb") as f:
        f.write(data[:half])  # what a killed fetch left behind
    done = _cli("fetch", "cifar10", "--config", config, "--quiet")
    assert done.returncode == 0, done.stderr
    assert ("cifar10/cifar-10-python.tar.gz", f"bytes={half}-") in server_files.requests
    assert os.path.exists(os.path.join(home, "data", "cifar10.h5"))
    assert not os.path.exists(temp)  # downloads are removed once converted


def test_damaged_cache_is_detected_and_rebuilt(tmp_path, files) -> None:
    _, sources = files
    config, home = _config(tmp_path, files)
    assert _cli("fetch", "mnist", "--config", config, "--quiet").returncode == 0
    h5 = os.path.join(home, "data", "mnist.h5")
    good_size = os.path.getsize(h5)
    with open(h5, "r+b") as f:
        f.truncate(good_size - 1000)  # a damaged copy (disk error, partial copy by hand)
    server = RunningServer("--config", config)
    try:
        with batchup_client.connect(server.endpoint) as client:
            test = client.source("mnist", split="test", fields=["X_u8", "y"], wait=60)
            X, y = next(test.batch_iterator(batch_size=100))
        np.testing.assert_array_equal(X, sources["mnist"].arrays["test_X_u8"])
        np.testing.assert_array_equal(y, sources["mnist"].arrays["test_y"])
        server.wait_for_log("damaged")
    finally:
        server.stop()
    assert os.path.getsize(h5) == good_size


def test_fetch_verify_catches_a_flipped_byte(tmp_path, files) -> None:
    config, home = _config(tmp_path, files)
    assert _cli("fetch", "mnist", "--config", config, "--quiet").returncode == 0
    h5 = os.path.join(home, "data", "mnist.h5")
    with open(h5, "r+b") as f:
        f.seek(os.path.getsize(h5) - 10)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    done = _cli("fetch", "mnist", "--config", config, "--quiet", "--verify")
    assert done.returncode == 0, done.stderr
    assert "damaged" in done.stdout and "SHA-256" in done.stdout
    again = _cli("fetch", "mnist", "--config", config, "--quiet", "--verify")
    assert "damaged" not in again.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_disk_full_while_converting_is_a_clear_error(tmp_path, files) -> None:
    home = tmp_path / "small"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(home)], check=True)
    try:
        config, _ = _config(tmp_path, files)
        with open(config) as f:
            text = f.read().replace(f'home = "{tmp_path / "home"}"', f'home = "{home}"')
        with open(config, "w") as f:
            f.write(text)
        done = _cli("fetch", "cifar10", "--config", config, "--quiet")
        assert done.returncode == 1
        assert "disk full" in done.stderr
        leftovers = [n for n in os.listdir(home / "data") if n.endswith((".h5", ".partial"))]
        assert leftovers == []
    finally:
        subprocess.run(["umount", str(home)], check=True)
