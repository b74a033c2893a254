"""Configuration parsing and the command line (``--help``, bad arguments)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from batchup_client.arrays import FULL_HASH_BYTES, KeyCache, _sample_digest
from batchup_protocol.host import content_key
from batchup_server.config import ConfigError, ServerConfig, load_config
from batchup_server.sources import FieldSpec, SourceError, SourceSpec, open_source


def write(tmp_path, text):
    path = tmp_path / "server.toml"
    path.write_text(text)
    return str(path)


def test_sources_and_options_from_toml(tmp_path):
    path = write(
        tmp_path,
        '[server]\nworkers = 3\n[sources.a]\nnpy = { X = "x.npy" }\n'
        '[sources.b]\nnpz = "d/b.npz"\n[sources.c]\nhdf5 = "c.h5"\ndatasets = { X = "g/X" }\n',
    )
    cfg = load_config(path, workers=None, bind="tcp://127.0.0.1:7")
    assert cfg.workers == 3 and cfg.bind == "tcp://127.0.0.1:7"
    assert cfg.sources["a"].fields[0] == FieldSpec("X", "npy", str(tmp_path / "x.npy"))
    assert cfg.npz["b"] == (str(tmp_path / "d" / "b.npz"), None)
    assert cfg.sources["c"].fields[0] == FieldSpec("X", "h5", str(tmp_path / "c.h5"), "g/X")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[server\n", "not valid TOML"),
        ("[server]\nfrobnicate = 1\n", "unknown option 'frobnicate'"),
        ("[server]\nworkers = 0\n", "workers should be >= 1"),
        ('[sources.x]\nnpy = "a.npy"\n', "should map field names"),
        ('[sources.x]\nnpy = { X = "a" }\nnpz = "b"\n', "exactly one of npy, npz, hdf5"),
        ('[sources.x]\nhdf5 = "a.h5"\n', "datasets should map"),
        ('[sources.demo]\nnpy = { X = "a" }\n', "the built-in demo data's.*--no-demo"),
        ('[server]\nworkers = "2"\n', "workers should be an integer, but got workers='2'"),
        ("[server]\nworkers = 2.0\n", "workers should be an integer"),
        (
            "[server]\nclient_timeout = true\n",
            "client_timeout should be a number, but got client_timeout=True",
        ),
        ("[server]\ntoken = 5\n", "token should be a string"),
        ("[server]\nidle_array_bytes = -1\n", "idle_array_bytes should be >= 0"),
        ('[server]\ntrust_client_code = "yes"\n', "trust_client_code should be true or false"),
        ('[server]\nbind = "localhost"\n', "bind should be an endpoint"),
        ('[source.x]\nnpy = { X = "a" }\n', r"unknown section\(s\) \['source'\].*\[sources.NAME\]"),
        (
            '[sources.x]\nnpy = { X = "a" }\nshuffle = true\n',
            r"sources.x \(npy\) has unknown option\(s\) \['shuffle'\]",
        ),
        ('[sources.x]\nnpz = "a.npz"\ndatasets = { X = "X" }\n', r"unknown option\(s\) \['datasets'\]"),
        ('[sources]\nx = "a.npy"\n', r"sources.x should be a table"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_demo_may_name_a_source_of_a_server_without_the_demo(tmp_path):
    cfg = load_config(write(tmp_path, '[sources.demo]\nnpy = { X = "a.npy" }\n'), demo=False)
    assert list(cfg.sources) == ["demo"] and not cfg.demo


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "nope.toml"))


def test_heartbeat_must_be_shorter_than_timeout():
    with pytest.raises(ConfigError, match="client_timeout should exceed"):
        ServerConfig(heartbeat_interval=5, client_timeout=5)


def test_sources_check_lengths_and_files(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(5))
    np.save(tmp_path / "b.npy", np.zeros(4))
    spec = SourceSpec(
        "s", (FieldSpec("a", "npy", str(tmp_path / "a.npy")), FieldSpec("b", "npy", str(tmp_path / "b.npy")))
    )
    with pytest.raises(SourceError, match="different lengths"):
        open_source(spec)
    with pytest.raises(SourceError, match="does not exist"):
        open_source(SourceSpec("s", (FieldSpec("a", "npy", str(tmp_path / "zz.npy")),)))
    np.save(tmp_path / "o.npy", np.array([{}, 1], dtype=object), allow_pickle=True)
    with pytest.raises(SourceError):
        open_source(SourceSpec("s", (FieldSpec("a", "npy", str(tmp_path / "o.npy")),)))
    np.savez(tmp_path / "z.npz", X=np.zeros(5))
    with pytest.raises(SourceError, match=r"is an .npz archive, not an .npy file; serve it with npz ="):
        open_source(SourceSpec("s", (FieldSpec("X", "npy", str(tmp_path / "z.npz")),)))
    import h5py

    with h5py.File(tmp_path / "g.h5", "w") as f:
        f["train/X"] = np.zeros(5)
    with pytest.raises(SourceError, match="'train' is a group, not a dataset"):
        open_source(SourceSpec("s", (FieldSpec("X", "h5", str(tmp_path / "g.h5"), "train"),)))


def test_an_npy_file_named_as_an_npz_archive_is_a_config_error(tmp_path):
    np.save(tmp_path / "X.npy", np.zeros(5))
    (tmp_path / "s.toml").write_text('[sources.a]\nnpz = "X.npy"\n')
    out = run_cli("--config", str(tmp_path / "s.toml"), "--bind", "tcp://127.0.0.1:0")
    assert out.returncode == 2 and "X.npy is a .npy file, not an .npz archive" in out.stderr, out.stderr


def test_h5_gather_handles_unsorted_and_repeated_indices(tmp_path):
    import h5py

    X = np.arange(40, dtype=np.float32).reshape(20, 2)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["X"] = X
    src = open_source(SourceSpec("s", (FieldSpec("X", "h5", str(tmp_path / "d.h5"), "X"),)))
    try:
        idx = np.array([7, 3, 7, 19, 0])
        np.testing.assert_array_equal(src.gather(idx, [0])[0], X[idx])
        with pytest.raises(IndexError):
            src.gather(np.array([20]), [0])
    finally:
        src.close()


def test_key_cache_rehashes_small_arrays_and_notices_big_changes():
    cache = KeyCache()
    small = np.arange(10)
    k1 = cache.key(small)
    small[3] = 99
    assert cache.key(small) != k1 == content_key(np.arange(10))
    big = np.zeros(FULL_HASH_BYTES // 8 + 1024)
    k2 = cache.key(big)
    assert cache.key(big) == k2
    big[:] = 1.0
    assert cache.key(big) == content_key(big) != k2


def test_key_cache_notices_a_rewrite_of_any_row_of_a_big_array():
    """Big arrays are re-hashed when a sample of one word per row changed: rewriting any
    one row (here each of them in turn) changes the sample; undoing it restores it."""
    rows = np.arange(5000 * 1000, dtype=np.int32).reshape(5000, 1000)  # 20 MB, 4,000-byte rows
    assert rows.nbytes > FULL_HASH_BYTES
    before = _sample_digest(rows)
    for r in range(len(rows)):
        rows[r] += 1
        assert _sample_digest(rows) != before, f"row {r} rewritten and not noticed"
        rows[r] -= 1
    assert _sample_digest(rows) == before
    cache = KeyCache()
    k = cache.key(rows)
    rows[4321] = -rows[4321]
    assert cache.key(rows) == content_key(rows) != k


@pytest.mark.parametrize("dtype", [np.int64, np.uint8])
def test_key_cache_notices_a_rewritten_row_of_a_long_array_of_small_rows(dtype):
    """3 million labels (24 MB of int64, or 3 MB of uint8 rows in a 2-D array over the
    threshold): a cap on the sampled words once left most rows unsampled, so relabelling
    them went unseen and the server kept serving the old labels."""
    n = 3_000_000
    labels = np.zeros(n, dtype) if dtype == np.int64 else np.zeros((n, 8), dtype)
    assert labels.nbytes > FULL_HASH_BYTES
    cache = KeyCache()
    k = cache.key(labels)
    for r in (1, 2, 12345, n - 7):
        labels[r] = 7
        assert cache.key(labels) == content_key(labels) != k, f"row {r} relabelled and not noticed"
        labels[r] = 0
        assert cache.key(labels) == k


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "batchup_server", *args], capture_output=True, text=True, timeout=60
    )


def test_help_explains_every_option():
    out = run_cli("--help")
    assert out.returncode == 0
    for option in (
        "--bind",
        "--config",
        "--workers",
        "--client-timeout",
        "--heartbeat-interval",
        "--max-message-bytes",
        "--token",
        "--no-demo",
        "--log-level",
        "ping",
        "SIGTERM",
        "keygen",
        "--curve-secret-key",
        "--curve-clients",
        "--insecure",
    ):
        assert option in out.stdout, option


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["--workers", "zero"], 2, "invalid int value"),
        (["--workers", "0"], 2, "workers should be >= 1"),
        (["--config", "/nonexistent.toml"], 2, "cannot read config file"),
        (["--insecure", "--bind", "tcp://256.1.1.1:1"], 1, "cannot bind"),  # not loopback: needs --insecure
    ],
)
def test_bad_arguments_exit_with_a_clear_message(args, code, text):
    out = run_cli(*args)
    assert out.returncode == code
    assert text in out.stderr


def test_ping_fails_when_nobody_answers():
    out = run_cli("ping", "tcp://127.0.0.1:9", "--timeout", "0.5")
    assert out.returncode == 1 and "nothing accepted a connection at tcp://127.0.0.1:9" in out.stderr
