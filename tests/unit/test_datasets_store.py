"""The dataset table, cache folder rules, config, split rules and field views (no server)."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from batchup_server.config import ConfigError, load_config
from batchup_server.datasets.catalog import DATASETS, UnknownDatasetError, lookup
from batchup_server.datasets.layout import DatasetRequestError, check_layout, dataset_source
from batchup_server.datasets.store import DatasetSettings, DatasetStore, batchup_home
from batchup_server.sources import FieldSpec, SourceSpec, open_source


# ---------------------------------------------------------------------- home folder
@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("BATCHUP_HOME", raising=False)
    return tmp_path


def test_home_defaults_to_dot_batchup(fake_home) -> None:
    assert batchup_home() == str(fake_home / ".batchup")


def test_home_from_env_then_cfg_file_wins(fake_home, monkeypatch) -> None:
    monkeypatch.setenv("BATCHUP_HOME", str(fake_home / "env-home"))
    assert batchup_home() == str(fake_home / "env-home")
    (fake_home / ".batchup.cfg").write_text(f"[paths]\ndata_dir = {fake_home / 'cfg-home'}\n")
    assert batchup_home() == str(fake_home / "cfg-home")  # batchup: cfg file > env > default


def test_cfg_file_without_paths_falls_back_to_env(fake_home, monkeypatch) -> None:
    (fake_home / ".batchup.cfg").write_text("[other]\nx = 1\n")
    monkeypatch.setenv("BATCHUP_HOME", str(fake_home / "env-home"))
    assert batchup_home() == str(fake_home / "env-home")


def test_store_puts_files_under_home_data(tmp_path) -> None:
    store = DatasetStore(DatasetSettings(home=str(tmp_path)))
    assert store.path(lookup("cifar10")) == str(tmp_path / "data" / "cifar10.h5")
    assert store.path(lookup("fashion-mnist")) == str(tmp_path / "data" / "fashion-mnist.h5")


# ---------------------------------------------------------------------- table and mirrors
def test_lookup_accepts_aliases_and_lists_known_names() -> None:
    assert lookup("STL").name == "stl10"
    assert lookup("fashion-mnist").name == "fashion_mnist"
    with pytest.raises(UnknownDatasetError) as info:
        lookup("imagenet")
    assert "imagenet" in str(info.value) and "cifar100" in str(info.value)


def test_table_keeps_batchup_checksums_and_names() -> None:
    assert len(DATASETS) == 8
    cifar = lookup("cifar10")
    assert cifar.files[0].sha256 == "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
    assert [f.filename for f in lookup("mnist").files][0] == "train-images-idx3-ubyte.gz"
    assert all(len(f.sha256) == 64 for d in DATASETS.values() for f in d.files)
    assert not any("yann.lecun.com" in m for m in lookup("mnist").mirrors[:1])  # a working mirror first


def test_configured_mirrors_come_first_and_checksums_can_be_overridden(tmp_path) -> None:
    settings = DatasetSettings(
        home=str(tmp_path),
        mirrors={"mnist": ("http://mirror.test/m",)},
        sha256={"mnist": {"t10k-labels-idx1-ubyte.gz": "ab" * 32}},
    )
    files = DatasetStore(settings).remote_files(lookup("mnist"))
    labels = next(f for f in files if f.filename == "t10k-labels-idx1-ubyte.gz")
    assert labels.urls[0] == "http://mirror.test/m/t10k-labels-idx1-ubyte.gz"
    assert labels.urls[1].startswith("https://ossci-datasets.s3.amazonaws.com/mnist/")
    assert labels.sha256 == "ab" * 32
    images = next(f for f in files if f.filename == "train-images-idx3-ubyte.gz")
    assert images.sha256 == lookup("mnist").files[0].sha256
    only = DatasetStore(DatasetSettings(home=str(tmp_path), builtin_mirrors=False)).remote_files(
        lookup("mnist")
    )
    assert all(f.urls == () for f in only)


# ---------------------------------------------------------------------- config
def test_datasets_table_in_config(tmp_path) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        '[datasets]\nhome = "h"\ndownload = true\nbuiltin_mirrors = false\n'
        '[datasets.mirrors]\nSTL = ["http://x/"]\n[datasets.sha256.mnist]\n"a.gz" = "00"\n'
    )
    settings = load_config(str(cfg)).datasets
    assert settings.home == str(tmp_path / "h")
    assert settings.download is True and settings.builtin_mirrors is False
    assert settings.mirrors == {"stl10": ("http://x/",)}
    assert settings.sha256 == {"mnist": {"a.gz": "00"}}
    overridden = load_config(str(cfg), data_home=str(tmp_path / "other"), download=False).datasets
    assert overridden.home == str(tmp_path / "other") and overridden.download is False


@pytest.mark.parametrize(
    "body, text",
    [
        ("[datasets]\nspeed = 1\n", "unknown option(s) ['speed']"),
        ("[datasets]\ndownload = 'yes'\n", "datasets.download should be true or false"),
        ("[datasets]\nmirrors = { mnist = 'http://x/' }\n", "datasets.mirrors should map"),
        ("[datasets.mirrors]\nimagenet = ['http://x/']\n", "unknown dataset 'imagenet'"),
        ("[datasets]\ntimeout = -1\n", "datasets.timeout should be a positive number"),
    ],
)
def test_bad_datasets_config_is_refused(tmp_path, body: str, text: str) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg))
    assert text in str(info.value)


# ---------------------------------------------------------------------- split rules
def _cifar_like(path: str, n_train: int = 12, n_test: int = 5) -> None:
    rng = np.random.RandomState(0)
    with h5py.File(path, "w") as f:
        g = f.create_group("cifar10")
        g["train_X_u8"] = rng.randint(0, 256, (n_train, 3, 4, 4)).astype(np.uint8)
        g["train_y"] = np.arange(n_train, dtype=np.int32)
        g["test_X_u8"] = rng.randint(0, 256, (n_test, 3, 4, 4)).astype(np.uint8)
        g["test_y"] = np.arange(n_test, dtype=np.int32)


def _rows(spec: SourceSpec, field: str = "y") -> np.ndarray:
    src = open_source(spec)
    try:
        return src.gather(np.arange(src.length), [src.names.index(field)])[0]
    finally:
        src.close()


@pytest.mark.parametrize("n_val", [None, 0, 1, 5, 11, 12, 30])
def test_train_and_val_follow_batchup_slicing(tmp_path, n_val: int | None) -> None:
    path = str(tmp_path / "c.h5")
    _cifar_like(path)
    y = np.arange(12)
    want_train, want_val = (y, y[:0]) if not n_val else (y[:-n_val], y[-n_val:])
    info = lookup("cifar10")
    train = dataset_source(info, path, {"split": "train", "n_val": n_val}, str(tmp_path))
    val = dataset_source(info, path, {"split": "val", "n_val": n_val}, str(tmp_path))
    np.testing.assert_array_equal(_rows(train), want_train)
    np.testing.assert_array_equal(_rows(val), want_val)
    assert [f.name for f in train.fields] == ["X", "X_u8", "y"]
    assert train.metadata["default_fields"] == ["X", "y"]


def test_x_is_batchups_float32_mapping(tmp_path) -> None:
    path = str(tmp_path / "c.h5")
    _cifar_like(path)
    spec = dataset_source(lookup("cifar10"), path, {"split": "test", "val_lower": -2, "val_upper": 3}, "")
    with h5py.File(path) as f:
        u8 = f["cifar10/test_X_u8"][()]
    want = u8.astype(np.float32) * np.float32(5 / 255.0) + np.float32(-2)
    got = _rows(spec, "X")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_bad_requests_are_typed_errors(tmp_path) -> None:
    path = str(tmp_path / "c.h5")
    _cifar_like(path)
    info = lookup("cifar10")
    for params in ({"split": "unlabeled"}, {"n_val": 1.5}, {"n_val": True}, {"val_upper": None}, {"x": 1}):
        with pytest.raises(DatasetRequestError):
            dataset_source(info, path, params, "")
    with pytest.raises(DatasetRequestError, match="float32 already"):
        dataset_source(lookup("usps"), path, {"val_lower": 0.0}, "")


def test_check_layout_finds_missing_arrays_and_truncation(tmp_path) -> None:
    path = str(tmp_path / "c.h5")
    _cifar_like(path)
    assert check_layout(lookup("cifar10"), path) == ""
    assert "no group /mnist" in check_layout(lookup("mnist"), path)
    with h5py.File(path, "a") as f:
        del f["cifar10/test_y"]
    assert "test_y" in check_layout(lookup("cifar10"), path)
    _cifar_like(path, n_train=2000)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    assert check_layout(lookup("cifar10"), path) != ""


# ---------------------------------------------------------------------- field views
def test_field_spec_wire_round_trip() -> None:
    spec = FieldSpec("X", "h5", "/d/c.h5", "/cifar10/train_X_u8", (3, 9), "/tmp/rows.npy", (-1.0, 1.0))
    assert FieldSpec.from_wire(spec.to_wire()) == spec
    plain = FieldSpec("y", "npy", "/d/y.npy")
    assert FieldSpec.from_wire(plain.to_wire()) == plain
    assert set(plain.to_wire()) == {"name", "kind", "path"}


@pytest.mark.parametrize("chunked", [False, True])
def test_row_views_and_scaling_agree_on_mapped_and_compressed_files(tmp_path, chunked: bool) -> None:
    """A contiguous dataset is memory-mapped, a compressed one read through h5py; both
    give the same rows for ranges, row lists (with negative indices) and scaling."""
    path = str(tmp_path / "a.h5")
    data = np.random.RandomState(1).randint(0, 256, (40, 2, 3)).astype(np.uint8)
    with h5py.File(path, "w") as f:
        if chunked:
            f.create_dataset("a", data=data, chunks=(8, 2, 3), compression="gzip")
        else:
            f["a"] = data
    index = np.array([7, 3, 3, 19, 0], dtype=np.int64)
    np.save(tmp_path / "rows.npy", index)
    ranged = open_source(SourceSpec("r", (FieldSpec("r", "h5", path, "a", rows=(10, 30)),)))
    listed = SourceSpec(
        "s",
        (
            FieldSpec("i", "h5", path, "a", rows=(10, 30), row_index=str(tmp_path / "rows.npy")),
            FieldSpec(
                "f", "h5", path, "a", rows=(10, 30), row_index=str(tmp_path / "rows.npy"), scale=(0, 2)
            ),
        ),
    )
    src = open_source(listed)
    try:
        assert ranged.length == 20 and src.length == 5
        assert isinstance(ranged.fields[0].base, np.memmap) is (not chunked)
        idx = np.array([4, -1, 0, 2])
        (r,) = ranged.gather(idx, [0])
        i, f = src.gather(idx, [0, 1])
        np.testing.assert_array_equal(r, data[10:30][idx])
        np.testing.assert_array_equal(i, data[10:30][index][idx])
        np.testing.assert_array_equal(f, data[10:30][index][idx].astype(np.float32) * np.float32(2 / 255))
        out = np.empty((4, 2, 3), np.float32)
        src.gather_into(idx, [1], [out])
        np.testing.assert_array_equal(out, f)
    finally:
        src.close()
        ranged.close()
