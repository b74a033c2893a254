"""Dataset converters: batchup 0.2.3's own fetchers are the oracle, plus format edge cases.

batchup's converters run offline in ONE subprocess (it caches its home at import time): the
synthetic sources are copied to ``<BATCHUP_HOME>/data/temp/<filename>``, which batchup's
``download_and_verify`` returns as is when the file exists (no SHA-256 check is made on an
existing file), then the resulting PyTables file is dumped to an .npz per dataset.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import tracemalloc

import h5py
import numpy as np
import pytest

from batchup_server.datasets import formats
from batchup_server.datasets.formats import CONVERTERS, FormatError, iter_mat_variables, read_fold_indices
from tests import datasets_synth as synth

# converter key -> (batchup module, fetch function, h5 group)
ORACLE_JOBS = {
    "mnist": ("mnist", "fetch_mnist", "mnist"),
    "svhn_train_test": ("svhn", "fetch_svhn_train_test", "svhn"),
    "svhn_extra": ("svhn", "fetch_svhn_extra", "svhn"),
    "cifar10": ("cifar10", "fetch_cifar10", "cifar10"),
    "cifar100": ("cifar100", "fetch_cifar100", "cifar100"),
    "stl": ("stl", "fetch_stl", "stl"),
    "usps": ("usps", "usps_data", "usps"),
}

ORACLE_SCRIPT = r"""
import importlib, json, os, shutil, sys
import numpy as np
import batchup.config as config
config._CONFIG_PATH = os.path.join(os.environ["BATCHUP_HOME"], "absent.cfg")  # ignore ~/.batchup.cfg
import tables
temp = os.path.join(config.get_data_dir(), "temp")
os.makedirs(temp, exist_ok=True)
for module, fetch, group, sources, out in json.loads(sys.argv[1]):
    for name, path in sources.items():
        shutil.copy(path, os.path.join(temp, name))
    h5_path = getattr(importlib.import_module("batchup.datasets." + module), fetch)()
    assert h5_path is not None, fetch
    arrays = {}
    with tables.open_file(h5_path) as f:
        for node in f.get_node("/" + group):
            if isinstance(node, tables.VLArray):
                for i, row in enumerate(node):
                    arrays[f"{node.name}.{i}"] = row
            else:
                arrays[node.name] = np.asarray(node[:])
    np.savez(out, **arrays)
"""


def build_sources(folder: str) -> dict[str, synth.Synth]:
    return {
        "mnist": synth.write_mnist_sources(folder),
        "svhn_train_test": synth.write_svhn_train_test(folder),
        "svhn_extra": synth.write_svhn_extra(folder),
        "cifar10": synth.write_cifar10_tar(folder),
        "cifar100": synth.write_cifar100_tar(folder),
        "stl": synth.write_stl_tar(folder),
        "usps": synth.write_usps_h5(os.path.join(folder, "usps.h5")),
    }


def run_batchup_oracle(home: str, jobs: dict[str, tuple[str, str, str, dict[str, str]]]) -> dict[str, dict]:
    """Run batchup 0.2.3's fetchers on the given sources; key -> {dataset name: array}."""
    outs = {key: os.path.join(home, f"oracle-{key}.npz") for key in jobs}
    spec = [[*jobs[key], outs[key]] for key in jobs]
    env = dict(os.environ, BATCHUP_HOME=home, PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-c", ORACLE_SCRIPT, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = {}
    for key, out in outs.items():
        with np.load(out) as npz:
            result[key] = {name: npz[name] for name in npz.files}
    return result


def convert(key: str, sources: dict[str, str], out_path: str, progress: bool = False) -> str:
    with h5py.File(out_path, "w") as out:
        CONVERTERS[key](sources, out, progress)
    return out_path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, synth.Synth]]:
    folder = str(tmp_path_factory.mktemp("sources"))
    built = build_sources(folder)
    return {
        key: (convert(key, s.paths, os.path.join(folder, f"{key}.ours.h5")), s) for key, s in built.items()
    }


@pytest.fixture(scope="module")
def oracle(
    converted: dict[str, tuple[str, synth.Synth]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict]:
    home = str(tmp_path_factory.mktemp("batchup_home"))
    jobs = {key: (*ORACLE_JOBS[key], s.paths) for key, (_, s) in converted.items()}
    return run_batchup_oracle(home, jobs)


@pytest.mark.parametrize("key", list(ORACLE_JOBS))
def test_converter_matches_batchup(key: str, converted: dict, oracle: dict) -> None:
    path, made = converted[key]
    expected = oracle[key]
    group_name = ORACLE_JOBS[key][2]
    with h5py.File(path, "r") as f:
        group = f[group_name]
        folds = sorted(
            (n for n in expected if n.startswith("fold_indices.")), key=lambda n: int(n.split(".")[1])
        )
        assert set(group) == {n for n in expected if n not in folds} | ({"fold_indices"} if folds else set())
        for name in group:
            if name == "fold_indices":
                ours = read_fold_indices(group)
                assert len(ours) == len(folds) == 10
                for row, fold in zip(ours, folds):
                    assert row.dtype == np.int32 and expected[fold].dtype == np.int32
                    np.testing.assert_array_equal(row, expected[fold])
                continue
            ours = group[name][...]
            assert ours.dtype == expected[name].dtype, name
            assert ours.shape == expected[name].shape, name
            np.testing.assert_array_equal(ours, expected[name], err_msg=name)
        for name, arr in made.arrays.items():  # the builders' expectations agree too
            np.testing.assert_array_equal(group[name][...], arr, err_msg=name)


def big_arrays(group: h5py.Group) -> list[h5py.Dataset]:
    return [d for n, d in group.items() if n not in ("class_names", "class_names_coarse", "fold_indices")]


@pytest.mark.parametrize("key", list(ORACLE_JOBS))
def test_big_arrays_are_contiguous_and_memory_mappable(key: str, converted: dict) -> None:
    path, _ = converted[key]
    with h5py.File(path, "r") as f:
        datasets = big_arrays(f[ORACLE_JOBS[key][2]])
        layout = [
            (d.name, d.chunks, d.compression, d.id.get_offset(), d.dtype, d.shape, d[...]) for d in datasets
        ]
    assert layout
    for name, chunks, compression, offset, dtype, shape, values in layout:
        assert chunks is None and compression is None and offset is not None, name
        np.testing.assert_array_equal(
            np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape), values
        )


# --- MAT v5 reader --------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [True, False])
def test_mat_reader_matches_loadmat(tmp_path, compressed: bool) -> None:
    from scipy.io import loadmat, savemat

    path = str(tmp_path / "vars.mat")
    data = {
        "X": np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        "a_longer_variable_name": np.linspace(0.0, 1.0, 7).reshape(7, 1),  # name not packed in its tag
        "s": np.uint8(3),  # 1x1: real part in the small data element format
        "i16": np.array([[-3, 4], [5, -6]], dtype=np.int16),
    }
    savemat(path, data, do_compression=compressed)
    reference = loadmat(path)
    seen = []
    for var in iter_mat_variables(path):
        seen.append(var.name)
        assert var.dims == reference[var.name].shape
        assert var.dtype == reference[var.name].dtype
        values = var.read(var.size).reshape(var.dims, order="F")
        np.testing.assert_array_equal(values, reference[var.name])
    assert seen == list(data)


def hand_built_mat(order: str, variables: list[tuple[str, int, int, np.ndarray]]) -> bytes:
    """An uncompressed MAT v5 file in byte order ``order``: (name, mx class, mi type, values)."""
    mark = b"IM" if order == "<" else b"MI"
    out = [
        b"MATLAB 5.0 MAT-file, hand-built".ljust(116) + b"\0" * 8 + struct.pack(order + "H", 0x0100) + mark
    ]

    def element(mtype: int, data: bytes) -> bytes:
        return struct.pack(order + "II", mtype, len(data)) + data + b"\0" * (-len(data) % 8)

    for name, mx_class, mi_type, values in variables:
        stored = values.astype(values.dtype.newbyteorder(order)).tobytes(order="F")
        matrix = element(6, struct.pack(order + "II", mx_class, 0))
        matrix += element(5, struct.pack(f"{order}{values.ndim}i", *values.shape))
        matrix += element(1, name.encode()) + element(mi_type, stored)
        out.append(element(14, matrix))
    return b"".join(out)


@pytest.mark.parametrize("order", ["<", ">"])
def test_mat_reader_byte_order_and_narrowed_storage(tmp_path, order: str) -> None:
    """MATLAB may store a double array of small integers as uint8; big-endian files exist too."""
    from scipy.io import loadmat

    rng = np.random.RandomState(3)
    x = rng.randint(0, 256, size=(32, 32, 3, 4)).astype(np.uint8)
    y = np.array([[10], [1], [2], [10]], dtype=np.uint8)
    scores = np.linspace(-1.5, 2.5, 6).reshape(2, 3)
    path = tmp_path / "extra_32x32.mat"
    path.write_bytes(hand_built_mat(order, [("X", 9, 2, x), ("scores", 6, 9, scores), ("y", 6, 2, y)]))
    reference = loadmat(str(path))
    variables = []
    for var in iter_mat_variables(str(path)):
        variables.append((var.name, var.dtype, var.stored.str))
        np.testing.assert_array_equal(var.read(var.size).reshape(var.dims, order="F"), reference[var.name])
    assert variables == [
        ("X", np.uint8, "|u1"),
        ("scores", np.float64, order + "f8"),
        ("y", np.float64, "|u1"),
    ]
    with h5py.File(convert("svhn_extra", {"extra_32x32.mat": str(path)}, str(tmp_path / "out.h5")), "r") as f:
        np.testing.assert_array_equal(f["svhn/extra_X_u8"][...], x.transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(f["svhn/extra_y"][...], [0, 1, 2, 0])


def test_mat_reader_skips_unread_data(tmp_path) -> None:
    from scipy.io import savemat

    path = str(tmp_path / "two.mat")
    savemat(path, {"X": np.ones((32, 32, 3, 5), np.uint8), "y": np.arange(5.0).reshape(5, 1)})
    with contextlib.closing(iter_mat_variables(path)) as variables:
        names = [v.name for v in variables]  # X's data never read
    assert names == ["X", "y"]


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_mat_is_a_format_error(tmp_path, compressed: bool, keep: float) -> None:
    path = str(tmp_path / "train_32x32.mat")
    synth.write_svhn_mat(path, 30, seed=0, compressed=compressed)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    sources = {"train_32x32.mat": path, "test_32x32.mat": path}
    with pytest.raises(FormatError, match="train_32x32.mat.*truncated"):
        convert("svhn_train_test", sources, str(tmp_path / "out.h5"))


def test_mat_v73_is_refused(tmp_path) -> None:
    path = str(tmp_path / "extra_32x32.mat")
    with h5py.File(path, "w", userblock_size=512) as f:
        f["X"] = np.zeros((5, 3, 32, 32), np.uint8)
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0200) + b"IM"
    with open(path, "r+b") as f:
        f.write(header)
    with pytest.raises(FormatError, match=r"extra_32x32.mat: MAT v7.3 is not supported"):
        convert("svhn_extra", {"extra_32x32.mat": path}, str(tmp_path / "out.h5"))


def test_mat_sparse_variable_is_refused(tmp_path) -> None:
    from scipy.io import savemat
    from scipy.sparse import csc_matrix

    path = str(tmp_path / "extra_32x32.mat")
    savemat(path, {"X": csc_matrix(np.eye(3))})
    with pytest.raises(FormatError, match="'X' is a MATLAB sparse array"):
        convert("svhn_extra", {"extra_32x32.mat": path}, str(tmp_path / "out.h5"))


def test_svhn_needs_both_variables(tmp_path) -> None:
    from scipy.io import savemat

    path = str(tmp_path / "extra_32x32.mat")
    savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(FormatError, match="no variable 'y'"):
        convert("svhn_extra", {"extra_32x32.mat": path}, str(tmp_path / "out.h5"))


# --- CIFAR pickles --------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("key", ["cifar10", "cifar100"])
def test_malicious_pickle_is_refused_without_running(tmp_path, key: str) -> None:
    marker = tmp_path / "pwned"
    tarball, member = {
        "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py/data_batch_1"),
        "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python/train"),
    }[key]
    path = str(tmp_path / tarball)
    payload = pickle.dumps({"data": _Payload(str(marker)), "labels": []}, protocol=2)
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(FormatError, match=r"refers to posix\.system.*refusing"):
        convert(key, {tarball: path}, str(tmp_path / "out.h5"))
    assert not marker.exists()


def test_cifar10_missing_batch_is_named(tmp_path) -> None:
    path = str(tmp_path / "cifar-10-python.tar.gz")
    with tarfile.open(path, "w:gz"):
        pass
    with pytest.raises(FormatError, match="missing member.*data_batch_1"):
        convert("cifar10", {"cifar-10-python.tar.gz": path}, str(tmp_path / "out.h5"))


def test_not_a_tarball_is_a_format_error(tmp_path) -> None:
    path = tmp_path / "stl10_binary.tar.gz"
    path.write_bytes(b"this is not gzip at all" * 10)
    with pytest.raises(FormatError, match="stl10_binary.tar.gz"):
        convert("stl", {"stl10_binary.tar.gz": str(path)}, str(tmp_path / "out.h5"))


# --- MNIST idx ------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
def test_bad_idx_magic_is_a_format_error(tmp_path, filename: str) -> None:
    made = synth.write_mnist_sources(str(tmp_path), n_train=10, n_test=5)
    bad_magic = 2049 if "images" in filename else 2051
    with gzip.open(made.paths[filename], "rb") as f:
        data = f.read()
    with gzip.open(made.paths[filename], "wb") as f:
        f.write(struct.pack(">i", bad_magic) + data[4:])
    expected = 2051 if "images" in filename else 2049
    with pytest.raises(
        FormatError, match=f"{filename}: idx magic number is {bad_magic}, expected {expected}"
    ):
        convert("mnist", made.paths, str(tmp_path / "out.h5"))


def test_idx_truncated_and_mismatched_counts(tmp_path) -> None:
    made = synth.write_mnist_sources(str(tmp_path), n_train=10, n_test=5)
    name = "t10k-images-idx3-ubyte.gz"
    with gzip.open(made.paths[name], "rb") as f:
        data = f.read()
    with gzip.open(made.paths[name], "wb") as f:
        f.write(data[:-100])
    with pytest.raises(FormatError, match=f"{name}: image data is truncated"):
        convert("mnist", made.paths, str(tmp_path / "out.h5"))
    with gzip.open(made.paths[name], "wb") as f:
        f.write(data[:4] + struct.pack(">i", 4) + data[8:])
    with pytest.raises(FormatError, match="5 labels for 4 images"):
        convert("mnist", made.paths, str(tmp_path / "out2.h5"))


# --- STL ------------------------------------------------------------------------------------


def test_stl_missing_member_is_named(tmp_path) -> None:
    made = synth.write_stl_tar(str(tmp_path), n_train=5, n_test=4, n_unl=3)
    path = made.paths["stl10_binary.tar.gz"]
    stripped = str(tmp_path / "stripped.tar.gz")
    with tarfile.open(path, "r:gz") as src, tarfile.open(stripped, "w:gz") as dst:
        for member in src:
            if not member.name.endswith("fold_indices.txt"):
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    with pytest.raises(
        FormatError, match=r"stl10_binary.tar.gz: missing member\(s\) stl10_binary/fold_indices.txt"
    ):
        convert("stl", {"stl10_binary.tar.gz": stripped}, str(tmp_path / "out.h5"))


def test_stl_conversion_memory_is_bounded(tmp_path) -> None:
    """A ~200 MB unlabeled member converts with a peak far below its size (tracemalloc sees numpy)."""
    n_unl = 7300  # 7300 * 27648 B = 202 MB
    made = synth.write_stl_tar(str(tmp_path), n_train=10, n_test=10, n_unl=n_unl, lazy_unlabeled=True)
    out = str(tmp_path / "out.h5")
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        convert("stl", made.paths, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    member_bytes = n_unl * 3 * 96 * 96
    assert peak < 3 * formats._CHUNK_BYTES < member_bytes / 4, f"peak {peak / 2**20:.1f} MiB"
    with h5py.File(out, "r") as f:
        unl = f["stl/unl_X_u8"]
        assert unl.shape == (n_unl, 3, 96, 96) and unl.chunks is None
        for i in (0, 1234, n_unl - 1):
            raw = np.frombuffer(synth.stl_pattern_sample(i), np.uint8).reshape(3, 96, 96)
            np.testing.assert_array_equal(unl[i], raw.transpose(0, 2, 1))
    os.remove(out)  # 200 MB: do not leave it in pytest's kept temp folders


def test_read_fold_indices_accepts_2d(tmp_path) -> None:
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["stl/fold_indices"] = np.arange(20, dtype=np.int32).reshape(10, 2)
        folds = read_fold_indices(f["stl"])
    assert len(folds) == 10 and all(fold.dtype == np.int32 for fold in folds)
    np.testing.assert_array_equal(folds[3], [6, 7])


# --- USPS / progress ------------------------------------------------------------------------


def test_usps_wrong_layout_is_a_format_error(tmp_path) -> None:
    path = str(tmp_path / "usps.h5")
    with h5py.File(path, "w") as f:
        f["usps/train_X"] = np.zeros((3, 16, 16), np.float32)
    with pytest.raises(FormatError, match="usps.h5: /usps/train_X is float32"):
        convert("usps", {"usps.h5": path}, str(tmp_path / "out.h5"))


def test_progress_bar_is_shown_and_closed(tmp_path, capsys) -> None:
    made = synth.write_mnist_sources(str(tmp_path), n_train=10, n_test=5)
    convert("mnist", made.paths, str(tmp_path / "out.h5"), progress=True)
    err = capsys.readouterr().err
    assert "converting mnist" in err and "15/15" in err
    convert("mnist", made.paths, str(tmp_path / "quiet.h5"), progress=False)
    assert capsys.readouterr().err == ""
