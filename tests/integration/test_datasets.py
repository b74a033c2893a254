"""Standard datasets end to end: synthetic source files in each real format, served over a
local HTTP server, fetched and converted by a running batchup-server, streamed to a client
and compared with what batchup 0.2.3's own dataset classes make of the same files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

import batchup_client
from batchup_client import data_source
from batchup_client.datasets import cifar10, cifar100, fashion_mnist, mnist, stl, svhn, usps
from tests import datasets_synth as synth
from tests.http_server import FileServer
from tests.servers import RunningServer

pytestmark = pytest.mark.integration

N_VAL = {"mnist": 20, "fashion_mnist": 20, "svhn": 10, "cifar10": 30, "cifar100": 15, "usps": 9}
DROP_IN = {
    "mnist": ("mnist", "MNIST", mnist.MNIST, {"n_val": 20}),
    "fashion_mnist": ("fashion_mnist", "FashionMNIST", fashion_mnist.FashionMNIST, {"n_val": 20}),
    "svhn": ("svhn", "SVHN", svhn.SVHN, {"n_val": 10, "val_lower": -1.0, "val_upper": 1.0}),
    "svhn_extra": ("svhn", "SVHNExtra", svhn.SVHNExtra, {}),
    "cifar10": ("cifar10", "CIFAR10", cifar10.CIFAR10, {"n_val": 30}),
    "cifar100": ("cifar100", "CIFAR100", cifar100.CIFAR100, {"n_val": 15, "val_upper": 255.0}),
    "stl10": ("stl", "STL", stl.STL, {"n_val_folds": 2}),
    "usps": ("usps", "USPS", usps.USPS, {"n_val": 9}),
}


def build_sources(folder: str) -> dict[str, synth.Synth]:
    def sub(name: str) -> str:
        path = os.path.join(folder, name)
        os.makedirs(path, exist_ok=True)
        return path

    return {
        "mnist": synth.write_mnist_sources(sub("mnist"), n_train=80, n_test=25, seed=1),
        "fashion_mnist": synth.write_mnist_sources(sub("fashion_mnist"), n_train=60, n_test=20, seed=2),
        "svhn": synth.write_svhn_train_test(sub("svhn"), n_train=40, n_test=15),
        "svhn_extra": synth.write_svhn_extra(sub("svhn_extra"), n=30),
        "cifar10": synth.write_cifar10_tar(sub("cifar10"), n_per_batch=20, n_test=20),
        "cifar100": synth.write_cifar100_tar(sub("cifar100"), n_train=50, n_test=20),
        "stl10": synth.write_stl_tar(sub("stl10"), n_train=50, n_test=20, n_unl=15),
        "usps": synth.write_usps_h5(os.path.join(sub("usps"), "usps.h5"), n_train=40, n_test=20),
    }


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_config(path: str, home: str, port_url: str, sources: dict[str, synth.Synth], **extra: Any) -> str:
    """A server config whose mirrors are a dead URL, then the local file server."""
    lines = [
        "[datasets]",
        f'home = "{home}"',
        f"download = {str(extra.get('download', True)).lower()}",
        "builtin_mirrors = false",
        "timeout = 5",
        "attempts = 2",
        "[datasets.mirrors]",
    ]
    for name in sources:
        mirrors = extra.get("mirrors", {}).get(name, [f"{port_url}/dead/{name}/", f"{port_url}/{name}/"])
        lines.append(f"{name} = {json.dumps(mirrors)}")
    for name, s in sources.items():
        lines.append(f"[datasets.sha256.{name}]")
        sums = extra.get("sha256", {}).get(name, {})
        for filename, p in s.paths.items():
            lines.append(f'"{filename}" = "{sums.get(filename, sha256(p))}"')
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


ORACLE = r"""
import json, os, sys
import numpy as np
import batchup.config as config
config._CONFIG_PATH = os.path.join(os.environ["BATCHUP_HOME"], "absent.cfg")  # ignore ~/.batchup.cfg
import importlib
module, cls, kwargs, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
ds = getattr(importlib.import_module("batchup.datasets." + module), cls)(**kwargs)
arrays, lists = {}, {}
for name, value in vars(ds).items():
    if name in ("class_names", "class_names_coarse"):
        lists[name] = list(value)
    elif name == "tr_folds":
        for i, fold in enumerate(value):
            arrays[f"tr_folds_{i}"] = np.asarray(fold)
    else:
        arrays[name] = np.asarray(value[:])
np.savez(out, **arrays)
with open(out + ".json", "w") as f:
    json.dump(lists, f)
"""


def batchup_oracle(tmp: str, name: str, s: synth.Synth) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """batchup 0.2.3's dataset class on the same source files (its temp/ folder pre-filled,
    which batchup uses without downloading), run in a subprocess with its own home."""
    module, cls, _, kwargs = DROP_IN[name]
    home = os.path.join(tmp, f"batchup-home-{name}")
    os.makedirs(os.path.join(home, "data", "temp"), exist_ok=True)
    for filename, path in s.paths.items():
        shutil.copy(path, os.path.join(home, "data", "temp", filename))
    out = os.path.join(tmp, f"oracle-{name}.npz")
    env = dict(os.environ, BATCHUP_HOME=home, PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-c", ORACLE, module, cls, json.dumps(kwargs), out],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with np.load(out) as npz:
        arrays = {k: npz[k] for k in npz.files}
    with open(out + ".json") as f:
        return arrays, json.load(f)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = str(tmp_path_factory.mktemp("datasets"))
    sources = build_sources(os.path.join(tmp, "src"))
    with FileServer() as files:
        for name, s in sources.items():
            for filename, path in s.paths.items():
                with open(path, "rb") as f:
                    data = f.read()
                # mirrors misbehave: cifar100's first mirror answers 500, and the good mirror
                # of cifar10 drops the connection half-way through the first download
                files.add(f"{name}/{filename}", data, "truncate_once" if name == "cifar10" else "ok")
                files.add(f"broken/{name}/{filename}", data, "fail500")
        base = files.url("").rstrip("/")
        mirrors = {"cifar100": [f"{base}/broken/cifar100/", f"{base}/cifar100/"]}
        config = write_config(
            os.path.join(tmp, "server.toml"), os.path.join(tmp, "home"), base, sources, mirrors=mirrors
        )
        server = RunningServer("--config", config, "--no-demo", "--workers", "2")
        try:
            yield {"tmp": tmp, "sources": sources, "files": files, "server": server, "config": config}
        finally:
            server.stop()


@pytest.fixture(scope="module")
def client(world: Any) -> Any:
    with batchup_client.connect(world["server"].endpoint) as c:
        yield c


@pytest.mark.parametrize("name", list(DROP_IN))
def test_drop_in_class_matches_batchup(world: Any, client: Any, name: str) -> None:
    """Every attribute of the drop-in class equals batchup's, array for array and dtype for
    dtype, after the server downloaded (past a dead mirror), verified and converted it."""
    expected, lists = batchup_oracle(world["tmp"], name, world["sources"][name])
    _, _, cls, kwargs = DROP_IN[name]
    ds = cls(**kwargs, client=client, wait=60)
    folds = sorted((k for k in expected if k.startswith("tr_folds_")), key=lambda k: int(k.split("_")[-1]))
    assert folds or name != "stl10"
    for attr, want in expected.items():
        if attr.startswith("tr_folds_"):
            continue
        got = np.asarray(getattr(ds, attr))
        assert got.dtype == want.dtype, attr
        assert got.shape == want.shape, attr
        np.testing.assert_array_equal(got, want, err_msg=attr)
    for i, key in enumerate(folds):
        np.testing.assert_array_equal(ds.tr_folds[i], expected[key])
        assert ds.tr_folds[i].dtype == expected[key].dtype
    for attr, want in lists.items():
        assert getattr(ds, attr) == want, attr
    requests = world["files"].requests
    if name == "cifar10":  # the truncated download was resumed, not restarted
        assert any(
            p == "cifar10/cifar-10-python.tar.gz" and r and r.startswith("bytes=") for p, r in requests
        )
    if name == "cifar100":  # the failing mirror was retried, then the next one used
        assert sum(p == "broken/cifar100/cifar-100-python.tar.gz" for p, _ in requests) >= 2


@pytest.mark.parametrize("name", ["cifar10", "stl10", "usps"])
def test_array_data_source_of_dataset_fields_streams_batchup_batches(
    world: Any, client: Any, name: str
) -> None:
    """ArrayDataSource([ds.train_X, ds.train_y]) streams from the server's copy and gives
    batchup's batches, in batchup's order, leaving the RNG where batchup leaves it."""
    import batchup.data_source as bds

    expected, _ = batchup_oracle(world["tmp"], name, world["sources"][name])
    _, _, cls, kwargs = DROP_IN[name]
    ds = cls(**kwargs, client=client, wait=60)
    ours = data_source.ArrayDataSource([ds.train_X, ds.train_y], repeats=2)
    theirs = bds.ArrayDataSource([expected["train_X"], expected["train_y"]], repeats=2)
    rs_ours, rs_theirs = np.random.RandomState(7), np.random.RandomState(7)
    got = list(ours.batch_iterator(batch_size=7, shuffle=rs_ours))
    want = list(theirs.batch_iterator(batch_size=7, shuffle=rs_theirs))
    assert len(got) == len(want) > 2
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    assert rs_ours.randint(1 << 30) == rs_theirs.randint(1 << 30)


def test_client_source_fields_splits_and_metadata(world: Any, client: Any) -> None:
    s = world["sources"]["cifar100"]
    n_train = len(s.arrays["train_y"])
    train = client.source("cifar100", split="train", n_val=15, fields=["X_u8", "y", "y_coarse"], wait=60)
    assert len(train) == n_train - 15
    assert train.metadata["class_names"][:2] == [n.decode("latin1") for n in s.arrays["class_names"][:2]]
    assert len(train.metadata["class_names_coarse"]) == len(s.arrays["class_names_coarse"])
    X, y, yc = next(train.batch_iterator(batch_size=n_train))
    assert X.dtype == np.uint8 and y.dtype == np.int32 and yc.dtype == np.int32
    np.testing.assert_array_equal(X, s.arrays["train_X_u8"][:-15])
    np.testing.assert_array_equal(yc, s.arrays["train_y_coarse"][:-15])
    val = client.source("cifar100", split="val", n_val=15, val_lower=-1.0, val_upper=1.0)
    assert val.fields == ["X", "y"]
    (Xv, yv) = next(val.batch_iterator(batch_size=100))
    assert Xv.dtype == np.float32 and Xv.min() >= -1.0 and Xv.max() <= 1.0
    u8 = s.arrays["train_X_u8"][-15:]
    np.testing.assert_array_equal(Xv, u8.astype(np.float32) * np.float32(2.0 / 255.0) + np.float32(-1.0))
    empty = client.source("cifar100", split="val", n_val=0)
    assert len(empty) == 0 and list(empty.batch_iterator(batch_size=4)) == []
    unl = client.source("stl10", split="unlabeled", fields=["X_u8"], wait=60)
    np.testing.assert_array_equal(
        next(unl.batch_iterator(batch_size=100))[0], world["sources"]["stl10"].arrays["unl_X_u8"]
    )


@pytest.mark.parametrize(
    "bad, error, text",
    [
        ({"split": "bogus"}, batchup_client.InvalidArgumentError, "has no split 'bogus'"),
        ({"n_val": -3}, batchup_client.InvalidArgumentError, "n_val should be a non-negative integer"),
        ({"n_val_folds": 1}, batchup_client.InvalidArgumentError, "takes no n_val_folds"),
        ({"colour": True}, batchup_client.InvalidArgumentError, "takes no parameter(s) ['colour']"),
        ({"val_lower": "0"}, batchup_client.InvalidArgumentError, "val_lower should be a number"),
    ],
)
def test_bad_dataset_parameters_are_refused(client: Any, bad: dict[str, Any], error: type, text: str) -> None:
    with pytest.raises(error) as info:
        client.source("mnist", wait=60, **bad)
    assert text in str(info.value)
    assert len(client.source("mnist", n_val=20, wait=60)) == 60  # the connection still serves


def test_unknown_dataset_lists_the_known_ones(client: Any) -> None:
    with pytest.raises(batchup_client.UnknownSourceError) as info:
        client.source("imagenet")
    assert "imagenet" in str(info.value) and "cifar10" in str(info.value) and "usps" in str(info.value)


def test_second_fetch_is_instant_and_datasets_lists_the_cache(world: Any) -> None:
    """`batchup-server fetch` of a cached dataset makes no request and returns at once;
    `batchup-server datasets` shows it cached with its size."""
    files = world["files"]
    client = batchup_client.connect(world["server"].endpoint)
    with client:
        client.source("mnist", wait=60)  # cached by now (or fetched here)
    before = len(files.requests)
    start = time.monotonic()
    done = _cli("fetch", "mnist", "--config", world["config"])
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 10
    assert len(files.requests) == before
    assert "mnist.h5" in done.stdout
    listing = _cli("datasets", "--config", world["config"])
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("mnist "))
    assert " yes " in row and "MiB" in row
    assert any(line.startswith("svhn_extra") for line in listing.stdout.splitlines())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchup_server", *args], capture_output=True, text=True, timeout=120
    )
