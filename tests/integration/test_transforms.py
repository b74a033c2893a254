"""``ds.map``: functions run in the server's worker processes (trusted clients), named
transforms and custom sources from plugins, errors, and batchup's MapDataSource order."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from typing import Any

import batchup.data_source as bds
import numpy as np
import pytest

import batchup_client
import batchup_protocol as proto
from tests.servers import RunningServer, worker_pids, write_train_source

pytestmark = pytest.mark.integration

X = np.arange(300 * 4, dtype=np.float32).reshape(300, 4)
Y = np.arange(300, dtype=np.int64) % 7

PLUGIN = """
import numpy as np
from batchup_server.plugins import source, transform

@transform("scale")
def scale(X, y, factor=1.0):
    return X * np.float32(factor), y

@transform("noisy")
def noisy(X, y):
    return X + np.random.normal(size=X.shape).astype(np.float32), y

class Squares:                       # batchup's "array-like": len() and [int array]
    def __init__(self, n):
        self.n = n
    def __len__(self):
        return self.n
    def __getitem__(self, idx):
        return (np.asarray(idx, dtype=np.float32) ** 2)[:, None]

@source("squares")
def squares(n=10):
    return {"X": Squares(n), "y": np.arange(n) % 3}

@source("broken")
def broken():
    raise RuntimeError("the disk with the photos is not mounted")
"""


def _pid_and_double(X: Any, y: Any) -> Any:
    return X * 2, y, np.full(len(y), os.getpid())


def _augment(X: Any, y: Any) -> Any:  # draws from numpy's global RNG, as batchup's README example
    flip = np.random.uniform(size=len(X)) < 0.5
    out = X.copy()
    out[flip] = out[flip, ::-1]
    return out + np.random.normal(size=X.shape).astype(np.float32), y


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "bu_test_plugin.py").write_text(PLUGIN)
    return str(folder)


def _server(*args: str, plugin_dir: str | None = None, config: str | None = None) -> RunningServer:
    env = dict(os.environ)
    if plugin_dir:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (plugin_dir, env.get("PYTHONPATH", "")) if p)
    extra = ["--config", config] if config else []
    return RunningServer(*args, *extra, env=env)


def _write(tmp_path: Any, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def trusted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    cfg = write_train_source(tmp_path_factory.mktemp("trusted"), X, Y)
    server = _server("--trust-client-code", "--workers", str(request.param), config=cfg)
    try:
        yield server, request.param
    finally:
        server.stop()


def test_map_runs_in_server_workers_in_batchups_order(trusted: Any) -> None:
    server, _ = trusted
    with batchup_client.connect(server.endpoint) as client:
        assert client.trusts_code
        src = client.source("train").map(_pid_and_double)
        got = list(src.batch_iterator(batch_size=32, shuffle=np.random.RandomState(3)))
        want = list(
            bds.ArrayDataSource([X, Y])
            .map(lambda a, b: (a * 2, b))
            .batch_iterator(32, shuffle=np.random.RandomState(3))
        )
        assert len(got) == len(want) == 10
        for (gx, gy, _), (wx, wy) in zip(got, want):
            np.testing.assert_array_equal(gx, wx)
            np.testing.assert_array_equal(gy, wy)
        ran_in = {int(p) for _, _, p in got for p in set(p.tolist())}
        assert os.getpid() not in ran_in
        assert ran_in <= set(worker_pids(server.pid))


def test_random_augmentation_does_not_depend_on_workers_or_runs(trusted: Any) -> None:
    """np.random inside fn is seeded per batch from (seed, batch number): the same batches
    for 1 or 2 workers and for two runs; another seed gives others."""
    server, workers = trusted
    with batchup_client.connect(server.endpoint) as client:

        def run(seed: int) -> list[Any]:
            src = client.source("train").map(_augment, seed=seed)
            return list(src.batch_iterator(batch_size=50, shuffle=np.random.RandomState(0)))

        first, again, other = run(11), run(11), run(12)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(first[0][0], other[0][0])
    digest = float(sum(float(b[0].sum()) for b in first))
    _DIGESTS[workers] = digest
    if len(_DIGESTS) == 2:
        assert _DIGESTS[1] == _DIGESTS[2]


_DIGESTS: dict[int, float] = {}


@pytest.mark.parametrize(
    "fn, check",
    [
        (lambda X, y: X[:, :2], lambda b: isinstance(b, np.ndarray) and b.shape[1] == 2),
        (lambda X, y: [X, y], lambda b: isinstance(b, list) and len(b) == 2),
        (lambda X, y: None, lambda b: b is None),
        (lambda X, y: (y,), lambda b: isinstance(b, tuple) and len(b) == 1),
        (lambda X, y: (np.concatenate([X, X], 1).astype(np.float64), y), lambda b: b[0].dtype == np.float64),
    ],
    ids=["array", "list", "none", "tuple", "bigger-than-slot"],
)
def test_results_come_back_as_the_function_returned_them(trusted: Any, fn: Any, check: Any) -> None:
    server, _ = trusted
    with batchup_client.connect(server.endpoint) as client:
        src = client.source("train", repeats=3).map(fn)
        batches = list(src.batch_iterator(batch_size=8, shuffle=np.random.RandomState(1)))
    assert len(batches) == 3 * 300 // 8 + 1  # many batches through a few slots: no credit leak
    assert all(check(b) for b in batches)


def test_include_indices_come_first_to_the_function(trusted: Any) -> None:
    server, _ = trusted
    with batchup_client.connect(server.endpoint) as client:
        src = client.source("train", include_indices=True).map(lambda i, X, y: (i * 10, X))
        (idx10, xb) = next(src.batch_iterator(batch_size=5))
    np.testing.assert_array_equal(idx10, np.arange(5) * 10)
    np.testing.assert_array_equal(xb, X[:5])


def test_an_exception_in_fn_reaches_next_with_its_type_and_the_server_keeps_serving(trusted: Any) -> None:
    server, _ = trusted

    def fails_on_third(X: Any, y: Any) -> Any:
        if y[0] == Y[16]:
            raise KeyError("no augmentation for this class")
        return X, y

    with batchup_client.connect(server.endpoint) as client:
        it = client.source("train").map(fails_on_third).batch_iterator(batch_size=8)
        with pytest.raises(batchup_client.RemoteException) as info:
            for _ in it:
                pass
        assert info.value.remote_type == "KeyError"
        assert "no augmentation for this class" in str(info.value)
        assert "fails_on_third" in info.value.remote_traceback
        bad = client.source("train").map(lambda X, y: {"X": X})
        with pytest.raises(batchup_client.RemoteException) as info2:
            next(bad.batch_iterator(batch_size=8))
        assert info2.value.remote_type == "TransformError" and "dict" in str(info2.value)
        assert len(list(client.source("train").batch_iterator(batch_size=100))) == 3


def test_drop_in_map_of_a_main_script_function_runs_in_the_embedded_server(tmp_path) -> None:
    script = _write(
        tmp_path,
        "train.py",
        """
        import os
        import numpy as np
        from batchup_client import data_source

        def where(X, y):
            return X + 1, y, np.full(len(y), os.getpid())

        X = np.arange(40, dtype=np.float32).reshape(20, 2)
        ds = data_source.ArrayDataSource([X, np.arange(20)]).map(where)
        pids = set()
        for Xb, yb, pid in ds.batch_iterator(batch_size=6, shuffle=np.random.RandomState(0)):
            assert np.array_equal(Xb, X[yb] + 1)
            pids |= set(pid.tolist())
        print("ran in", sorted(pids), "client", os.getpid())
        assert os.getpid() not in pids
        """,
    )
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert "ran in" in done.stdout


def test_untrusted_server_runs_maps_here_or_refuses_without_unpickling(tmp_path, plugin_dir) -> None:
    cfg = write_train_source(tmp_path, X, Y)
    server = _server(config=cfg, plugin_dir=plugin_dir)
    try:
        with batchup_client.connect(server.endpoint) as client:
            assert not client.trusts_code
            here = client.source("train").map(_pid_and_double)
            (_, _, pids) = next(here.batch_iterator(batch_size=4))
            assert set(pids.tolist()) == {os.getpid()}  # where="auto": ran in this process
            with pytest.raises(batchup_client.UnauthorizedError) as info:
                next(client.source("train").map(_pid_and_double, where="server").batch_iterator(4))
            assert "--trust-client-code" in str(info.value)
            marker = tmp_path / "unpickled"
            evil = pickle.dumps(_Marker(str(marker)))
            key = "sha256:" + __import__("hashlib").sha256(evil).hexdigest()
            with pytest.raises(batchup_client.UnauthorizedError):
                client.request(
                    lambda rid: proto.RegisterCode(rid, key, "evil"), [np.frombuffer(evil, np.uint8)]
                )
            assert not marker.exists()
            assert len(client.source("train")) == 300  # still serving
    finally:
        server.stop()


class _Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def test_plugin_transforms_and_sources_for_untrusted_clients(tmp_path, plugin_dir) -> None:
    cfg = _write(
        tmp_path,
        "s.toml",
        """
        [server]
        plugins = ["bu_test_plugin"]
        [sources.sq]
        plugin = "squares"
        args = { n = 50 }
        """,
    )
    server = _server(config=cfg, plugin_dir=plugin_dir)
    try:
        with batchup_client.connect(server.endpoint) as client:
            assert client.transforms == ["noisy", "scale"]
            sq = client.source("sq")
            assert len(sq) == 50 and sq.fields == ["X", "y"]
            Xs = (np.arange(50, dtype=np.float32) ** 2)[:, None]
            ys = np.arange(50) % 3
            want = list(bds.ArrayDataSource([Xs, ys]).batch_iterator(8, shuffle=np.random.RandomState(5)))
            got = list(sq.batch_iterator(batch_size=8, shuffle=np.random.RandomState(5)))
            for g, w in zip(got, want, strict=True):
                for a, b in zip(g, w):
                    np.testing.assert_array_equal(a, b)
            scaled = next(sq.map("scale", factor=3.0).batch_iterator(batch_size=4))
            np.testing.assert_array_equal(scaled[0], Xs[:4] * 3)
            a1 = next(sq.map("noisy", seed=1).batch_iterator(batch_size=4))[0]
            a2 = next(sq.map("noisy", seed=1).batch_iterator(batch_size=4))[0]
            np.testing.assert_array_equal(a1, a2)
            with pytest.raises(batchup_client.InvalidArgumentError) as info:
                next(sq.map("rotate").batch_iterator(batch_size=4))
            assert "unknown transform 'rotate'" in str(info.value) and "scale" in str(info.value)
            with pytest.raises(ValueError):
                sq.map("scale", where="client")
    finally:
        server.stop()


def test_a_failing_plugin_source_stops_the_server_with_its_reason(tmp_path, plugin_dir) -> None:
    cfg = _write(
        tmp_path,
        "s.toml",
        """
        [server]
        plugins = ["bu_test_plugin"]
        [sources.photos]
        plugin = "broken"
        """,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([plugin_dir, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "batchup_server", "--config", cfg, "--bind", "tcp://127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2
    assert "the disk with the photos is not mounted" in done.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchup_server",
            "--plugin",
            "no_such_plugin_module",
            "--bind",
            "tcp://127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "cannot import plugin 'no_such_plugin_module'" in missing.stderr
