"""Small synthetic source files in each standard dataset's real format, for conversion tests.

Every builder returns a :class:`Synth`: the files it wrote (source filename -> path, the names
the converters and batchup expect) and the arrays a correct conversion must produce, already in
batchup's HDF5 layout (e.g. ``train_X_u8`` as (N, C, H, W) uint8, ``train_y`` int32).
Files are tiny (KB to a few MB) and quick to generate.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import struct
import tarfile
from collections.abc import Callable

import numpy as np

__all__ = [
    "Synth",
    "write_cifar10_tar",
    "write_cifar100_tar",
    "write_mnist_sources",
    "write_stl_tar",
    "write_svhn_extra",
    "write_svhn_mat",
    "write_svhn_train_test",
    "write_usps_h5",
    "LazyBytes",
    "stl_pattern_sample",
]


@dataclasses.dataclass
class Synth:
    paths: dict[str, str]  # source filename -> path written
    arrays: dict[str, np.ndarray]  # expected converted arrays, by dataset name in the h5 group
    extra: dict[str, object] = dataclasses.field(default_factory=dict)  # e.g. fold_indices


# --- MNIST ----------------------------------------------------------------------------------


def _write_idx(path: str, magic: int, dims: tuple[int, ...], data: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">{1 + len(dims)}i", magic, *dims))
        f.write(np.ascontiguousarray(data, np.uint8).tobytes())


def write_mnist_sources(folder: str, n_train: int = 120, n_test: int = 30, seed: int = 0) -> Synth:
    """The four gzipped idx files of MNIST (and Fashion-MNIST, same names)."""
    rng = np.random.RandomState(seed)
    out = Synth({}, {})
    names = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", n_train),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", n_test),
    }
    for split, (images, labels, n) in names.items():
        x = rng.randint(0, 256, size=(n, 1, 28, 28)).astype(np.uint8)
        y = rng.randint(0, 10, size=n).astype(np.uint8)
        out.paths[images] = os.path.join(folder, images)
        out.paths[labels] = os.path.join(folder, labels)
        _write_idx(out.paths[images], 2051, (n, 28, 28), x)
        _write_idx(out.paths[labels], 2049, (n,), y)
        out.arrays[f"{split}_X_u8"] = x
        out.arrays[f"{split}_y"] = y.astype(np.int32)
    return out


# --- SVHN -----------------------------------------------------------------------------------


def write_svhn_mat(
    path: str, n: int, seed: int, compressed: bool = True, y_dtype: type = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN-style .mat (X (32, 32, 3, n) uint8, y (n, 1) with labels 1..10, 10 meaning 0).

    Returns the expected (X_u8 (n, 3, 32, 32), y int32) as batchup converts them.
    """
    from scipy.io import savemat

    rng = np.random.RandomState(seed)
    x = rng.randint(0, 256, size=(32, 32, 3, n)).astype(np.uint8)
    y = rng.randint(1, 11, size=(n, 1))
    y[0, 0] = 10
    savemat(path, {"X": x, "y": y.astype(y_dtype)}, do_compression=compressed)
    labels = y[:, 0].astype(np.int32)
    labels[labels == 10] = 0
    return x.transpose(3, 2, 0, 1).copy(), labels


def write_svhn_train_test(folder: str, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Synth:
    """train compressed with double labels, test uncompressed with uint8 labels."""
    out = Synth({}, {})
    for split, n, compressed, y_dtype in (
        ("train", n_train, True, np.float64),
        ("test", n_test, False, np.uint8),
    ):
        name = f"{split}_32x32.mat"
        out.paths[name] = os.path.join(folder, name)
        x, y = write_svhn_mat(out.paths[name], n, seed + len(split), compressed, y_dtype)
        out.arrays[f"{split}_X_u8"], out.arrays[f"{split}_y"] = x, y
    return out


def write_svhn_extra(folder: str, n: int = 40, seed: int = 1) -> Synth:
    path = os.path.join(folder, "extra_32x32.mat")
    x, y = write_svhn_mat(path, n, seed, compressed=True)
    return Synth({"extra_32x32.mat": path}, {"extra_X_u8": x, "extra_y": y})


# --- tarballs -------------------------------------------------------------------------------


class LazyBytes(io.RawIOBase):
    """A file-like object producing ``size`` bytes from ``block(i)`` on demand (never all at once)."""

    def __init__(self, size: int, block_size: int, block: Callable[[int], bytes]):
        self.size, self.block_size, self.block = size, block_size, block
        self.pos = 0
        self.buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        out = bytearray()
        while len(out) < n:
            if not self.buf:
                i = (self.pos + len(out)) // self.block_size
                self.buf = self.block(i)[(self.pos + len(out)) % self.block_size :]
            take = self.buf[: n - len(out)]
            out += take
            self.buf = self.buf[len(take) :]
        self.pos += n
        return bytes(out)


def _add(tar: tarfile.TarFile, name: str, data: bytes | LazyBytes) -> None:
    info = tarfile.TarInfo(name)
    if isinstance(data, LazyBytes):
        info.size = data.size
        tar.addfile(info, data)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _cifar_pickle(obj: dict[str, object], legacy_numpy_names: bool) -> bytes:
    """Protocol 2, like the original Python 2 pickles; optionally with numpy 1's module names."""
    data = pickle.dumps(obj, protocol=2)
    if legacy_numpy_names:
        data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    return data


def _cifar_images(rng: np.random.RandomState, n: int) -> np.ndarray:
    return rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)


def write_cifar10_tar(folder: str, n_per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Synth:
    """cifar-10-python.tar.gz with its members out of order, as in the real tarball."""
    rng = np.random.RandomState(seed)
    path = os.path.join(folder, "cifar-10-python.tar.gz")
    batches = {f"data_batch_{i}": n_per_batch + i for i in range(1, 6)}  # unequal sizes: offsets matter
    batches["test_batch"] = n_test
    content = {}
    for name, n in batches.items():
        x, y = _cifar_images(rng, n), [int(v) for v in rng.randint(0, 10, size=n)]
        content[name] = (x, y)
    order = ["data_batch_4", "readme.html", "test_batch", "data_batch_3", "batches.meta"]
    order += ["data_batch_2", "data_batch_5", "data_batch_1"]
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(_dir_info("cifar-10-batches-py"))
        for name in order:
            member = f"cifar-10-batches-py/{name}"
            if name == "readme.html":
                _add(tar, member, b"<html></html>")
            elif name == "batches.meta":
                _add(tar, member, _cifar_pickle({"label_names": ["airplane"] * 10}, True))
            else:
                x, y = content[name]
                obj = {"batch_label": name, "labels": y, "data": x, "filenames": [f"{i}.png" for i in y]}
                _add(tar, member, _cifar_pickle(obj, legacy_numpy_names=True))
    train = [content[f"data_batch_{i}"] for i in range(1, 6)]
    arrays = {
        "train_X_u8": np.concatenate([x for x, _ in train]).reshape(-1, 3, 32, 32),
        "train_y": np.concatenate([np.array(y, np.int32) for _, y in train]),
        "test_X_u8": content["test_batch"][0].reshape(-1, 3, 32, 32),
        "test_y": np.array(content["test_batch"][1], np.int32),
    }
    return Synth({"cifar-10-python.tar.gz": path}, arrays)


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def write_cifar100_tar(folder: str, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Synth:
    """cifar-100-python.tar.gz: train, test (fine and coarse labels) and meta (class names)."""
    rng = np.random.RandomState(seed)
    path = os.path.join(folder, "cifar-100-python.tar.gz")
    fine = [f"fine_{i}" for i in range(100)]
    coarse = [f"coarse_{i}" for i in range(20)]
    arrays: dict[str, np.ndarray] = {}
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(_dir_info("cifar-100-python"))
        _add(
            tar,
            "cifar-100-python/meta",
            _cifar_pickle({"fine_label_names": fine, "coarse_label_names": coarse}, False),
        )
        for split, n in (("test", n_test), ("train", n_train)):
            x = _cifar_images(rng, n)
            y_fine, y_coarse = rng.randint(0, 100, size=n), rng.randint(0, 20, size=n)
            obj = {
                "batch_label": split,
                "data": x,
                "fine_labels": [int(v) for v in y_fine],
                "coarse_labels": [int(v) for v in y_coarse],
                "filenames": ["x.png"] * n,
            }
            _add(tar, f"cifar-100-python/{split}", _cifar_pickle(obj, legacy_numpy_names=False))
            arrays[f"{split}_X_u8"] = x.reshape(-1, 3, 32, 32)
            arrays[f"{split}_y"] = y_fine.astype(np.int32)
            arrays[f"{split}_y_coarse"] = y_coarse.astype(np.int32)
    arrays["class_names"] = np.array([n.encode() for n in fine])
    arrays["class_names_coarse"] = np.array([n.encode() for n in coarse])
    return Synth({"cifar-100-python.tar.gz": path}, arrays)


_STL_SAMPLE_BYTES = 3 * 96 * 96
STL_CLASS_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def stl_pattern_sample(i: int) -> bytes:
    """Unlabeled STL sample ``i`` of a lazily generated member: cheap and compressible."""
    return (np.arange(_STL_SAMPLE_BYTES, dtype=np.uint32) % 251 + i).astype(np.uint8).tobytes()


def _stl_file_images(x: np.ndarray) -> bytes:
    """(N, 3, 96, 96) -> the column-major bytes of STL's binaries."""
    return np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes()


def write_stl_tar(
    folder: str,
    n_train: int = 50,
    n_test: int = 40,
    n_unl: int = 30,
    seed: int = 0,
    lazy_unlabeled: bool = False,
) -> Synth:
    """stl10_binary.tar.gz: images (column-major), labels 1..10, class names, 10 folds.

    With ``lazy_unlabeled`` the unlabeled member is generated on the fly from
    :func:`stl_pattern_sample` (for big members) and is left out of ``arrays``.
    """
    rng = np.random.RandomState(seed)
    path = os.path.join(folder, "stl10_binary.tar.gz")
    x_train = rng.randint(0, 256, size=(n_train, 3, 96, 96)).astype(np.uint8)
    x_test = rng.randint(0, 256, size=(n_test, 3, 96, 96)).astype(np.uint8)
    y_train, y_test = rng.randint(1, 11, size=n_train), rng.randint(1, 11, size=n_test)
    folds = [np.sort(rng.choice(n_train, size=n_train // 5, replace=False)) for _ in range(10)]
    folds_txt = "".join(" ".join(str(v) for v in fold) + " \n" for fold in folds)
    arrays = {
        "train_X_u8": x_train,
        "train_y": (y_train - 1).astype(np.int32),
        "test_X_u8": x_test,
        "test_y": (y_test - 1).astype(np.int32),
        "class_names": np.array([n.encode() for n in STL_CLASS_NAMES]),
    }
    if lazy_unlabeled:
        unl: bytes | LazyBytes = LazyBytes(n_unl * _STL_SAMPLE_BYTES, _STL_SAMPLE_BYTES, stl_pattern_sample)
    else:
        x_unl = rng.randint(0, 256, size=(n_unl, 3, 96, 96)).astype(np.uint8)
        arrays["unl_X_u8"], unl = x_unl, _stl_file_images(x_unl)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.addfile(_dir_info("stl10_binary"))
        _add(tar, "stl10_binary/test_y.bin", y_test.astype(np.uint8).tobytes())  # labels before images
        _add(tar, "stl10_binary/test_X.bin", _stl_file_images(x_test))
        _add(tar, "stl10_binary/train_X.bin", _stl_file_images(x_train))
        _add(tar, "stl10_binary/unlabeled_X.bin", unl)
        _add(tar, "stl10_binary/train_y.bin", y_train.astype(np.uint8).tobytes())  # labels after images
        _add(tar, "stl10_binary/class_names.txt", "".join(n + "\n" for n in STL_CLASS_NAMES).encode())
        _add(tar, "stl10_binary/fold_indices.txt", folds_txt.encode())
    return Synth({"stl10_binary.tar.gz": path}, arrays, {"fold_indices": [f.astype(np.int32) for f in folds]})


# --- USPS -----------------------------------------------------------------------------------


def write_usps_h5(path: str, n_train: int = 40, n_test: int = 20, seed: int = 0) -> Synth:
    """usps.h5 like Britefury/usps_dataset's: blosc-9 PyTables EArrays under /usps."""
    import tables

    rng = np.random.RandomState(seed)
    arrays = {
        "train_X": rng.uniform(0.0, 1.0, size=(n_train, 1, 16, 16)).astype(np.float32),
        "train_y": rng.randint(0, 10, size=n_train).astype(np.int32),
        "test_X": rng.uniform(0.0, 1.0, size=(n_test, 1, 16, 16)).astype(np.float32),
        "test_y": rng.randint(0, 10, size=n_test).astype(np.int32),
    }
    filters = tables.Filters(complevel=9, complib="blosc")
    with tables.open_file(path, mode="w") as f:
        group = f.create_group(f.root, "usps", "USPS data")
        for name, arr in arrays.items():
            atom = tables.Atom.from_dtype(arr.dtype)
            earray = f.create_earray(group, name, atom, (0,) + arr.shape[1:], filters=filters)
            earray.append(arr)
    return Synth({"usps.h5": path}, arrays)
