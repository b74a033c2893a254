"""Streamed converters from each standard dataset's original files into one HDF5 file.

Every converter writes batchup 0.2.3's layout (group and dataset names, dtypes, shapes and
values), but with h5py and as CONTIGUOUS, UNCOMPRESSED, fixed-shape datasets, so that the
server can memory-map them (``dset.id.get_offset()``) instead of decompressing on every batch.

Memory stays bounded whatever the dataset size: sources are read as streams (gzip for idx,
``tarfile`` stream mode for tarballs, a small MAT v5 reader for SVHN) into reusable buffers of
at most ``_CHUNK_BYTES``, and each output dataset is created with its final shape up front
(from idx headers, MAT dimensions or tar member sizes) then filled slice by slice. The one
exception is a CIFAR pickle, which is loaded whole (one batch, at most ~150 MB).

Sources are checksum-verified downloads, but are still parsed defensively: anything not in the
expected format raises :class:`FormatError` naming the file and the problem, and CIFAR pickles
are loaded with an unpickler that can only rebuild numpy arrays.

``fold_indices`` (STL) is always stored as a 1-D h5py variable-length int32 dataset (one row per
fold, like batchup's VLArray); read it back with :func:`read_fold_indices`.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import gzip
import importlib
import io
import math
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any, Protocol, cast

import h5py
import numpy as np
from tqdm import tqdm

__all__ = [
    "CONVERTERS",
    "ConvertFn",
    "FormatError",
    "MatVariable",
    "iter_mat_variables",
    "read_fold_indices",
]

ConvertFn = Callable[[Mapping[str, str], h5py.File, bool], None]
"""``convert(sources, out, progress)``: source filename -> local path, h5py file open for writing."""

_CHUNK_BYTES = 16 * 2**20
"""Upper bound of one conversion buffer; two are alive at once (raw samples, converted samples)."""

_PIECE = 2**20
"""Bytes asked of a stream per read, so decompressors never build large temporary strings."""


class FormatError(ValueError):
    """A source file is not in the format its dataset's converter expects."""


# --- reading bytes --------------------------------------------------------------------------


class _Reader(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def _fill(reader: _Reader, out: np.ndarray, what: str) -> None:
    """Fill the contiguous array ``out`` from ``reader``; a short stream is a truncated file."""
    if not out.flags.c_contiguous:
        raise ValueError("_fill needs a C-contiguous array")
    view = out.reshape(-1).view(np.uint8).data
    pos = 0
    while pos < len(view):
        got = reader.readinto(view[pos : pos + _PIECE])
        if not got:
            raise FormatError(f"{what} is truncated: it ends {len(view) - pos} bytes early")
        pos += got


def _read_exact(reader: _Reader, n: int, what: str) -> bytes:
    buf = np.empty(n, np.uint8)
    _fill(reader, buf, what)
    return buf.tobytes()


def _expect_end(reader: _Reader, what: str) -> None:
    """Trailing bytes mean the header under-announced the content: refuse rather than drop data."""
    if reader.readinto(memoryview(bytearray(1))):
        raise FormatError(f"{what} has more data than its header announces")


@contextlib.contextmanager
def _decoding_errors(filename: str) -> Iterator[None]:
    """Turn the errors of broken gzip/zlib/tar streams into FormatError naming the file."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise FormatError(f"{filename}: not a readable archive/stream ({exc})") from exc


# --- writing samples ------------------------------------------------------------------------


def _new_dataset(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any) -> h5py.Dataset:
    """A contiguous, unfiltered dataset of final shape: no chunks, so it can be memory-mapped."""
    return group.create_dataset(name, shape=shape, dtype=dtype)


@dataclasses.dataclass
class _Samples:
    """Where ``n`` samples read from a stream go: ``dset[start : start + n]``.

    ``stored`` is the dtype of the bytes in the stream; ``transpose_hw`` says the stream holds
    each image column-major (C, W, H), as STL's binaries and MATLAB's Fortran-ordered X do.
    """

    dset: h5py.Dataset
    n: int
    start: int = 0
    stored: np.dtype = dataclasses.field(default_factory=lambda: np.dtype(np.uint8))
    transpose_hw: bool = False


def _copy_samples(reader: _Reader, target: _Samples, bar: tqdm | None, what: str) -> None:
    """Stream ``target.n`` samples through two reusable buffers into the output dataset.

    ``bar`` counts the samples (None for labels of samples already counted with their images).
    """
    sample = tuple(target.dset.shape[1:])
    raw_shape = sample[:-2] + (sample[-1], sample[-2]) if target.transpose_hw else sample
    itemsize = max(target.stored.itemsize, target.dset.dtype.itemsize)
    per_chunk = max(1, _CHUNK_BYTES // (math.prod(sample) * itemsize))
    size = min(per_chunk, target.n)
    raw = np.empty((size,) + raw_shape, target.stored)
    out = np.empty((size,) + sample, target.dset.dtype)
    for i in range(0, target.n, per_chunk):
        k = min(per_chunk, target.n - i)
        _fill(reader, raw[:k], what)
        src = raw[:k].swapaxes(-1, -2) if target.transpose_hw else raw[:k]
        np.copyto(out[:k], src, casting="unsafe")
        target.dset[target.start + i : target.start + i + k] = out[:k]
        if bar is not None:
            bar.update(k)


def _progress(name: str, progress: bool, total: int | None = None) -> tqdm:
    return tqdm(total=total, unit="samples", desc=f"converting {name}", disable=not progress)


def _grow_total(bar: tqdm, n: int) -> None:
    """Tarball converters learn their sample counts member by member."""
    bar.total = (bar.total or 0) + n
    bar.refresh()


def _source(sources: Mapping[str, str], filename: str) -> str:
    try:
        return sources[filename]
    except KeyError:
        raise KeyError(f"source file {filename!r} was not given (got {sorted(sources)})") from None


# --- MNIST / Fashion-MNIST (gzipped idx) ----------------------------------------------------

_IDX_IMAGES, _IDX_LABELS = 2051, 2049
_MNIST_SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _idx_header(reader: _Reader, filename: str, magic: int, ndim: int) -> tuple[int, ...]:
    """Check an idx header (big-endian magic then dims) and return the dims."""
    head = _read_exact(reader, 4 * (1 + ndim), f"{filename}: idx header")
    found, *dims = struct.unpack(f">{1 + ndim}i", head)
    if found != magic:
        raise FormatError(f"{filename}: idx magic number is {found}, expected {magic}")
    if min(dims) < 0:
        raise FormatError(f"{filename}: idx header has negative dimensions {tuple(dims)}")
    return tuple(dims)


def _convert_mnist_split(group: h5py.Group, split: str, paths: tuple[str, str], bar: tqdm) -> None:
    images_name, labels_name = _MNIST_SPLITS[split]
    images_path, labels_path = paths
    with gzip.open(images_path, "rb") as images, gzip.open(labels_path, "rb") as labels:
        with _decoding_errors(images_name):
            n, rows, cols = _idx_header(images, images_name, _IDX_IMAGES, 3)
        if (rows, cols) != (28, 28):
            raise FormatError(f"{images_name}: images are {rows}x{cols}, expected 28x28")
        with _decoding_errors(labels_name):
            (n_labels,) = _idx_header(labels, labels_name, _IDX_LABELS, 1)
        if n_labels != n:
            raise FormatError(f"{labels_name}: {n_labels} labels for {n} images in {images_name}")
        _grow_total(bar, n)
        x = _new_dataset(group, f"{split}_X_u8", (n, 1, 28, 28), np.uint8)
        y = _new_dataset(group, f"{split}_y", (n,), np.int32)
        with _decoding_errors(images_name):
            _copy_samples(images, _Samples(x, n), bar, f"{images_name}: image data")
            _expect_end(images, images_name)
        with _decoding_errors(labels_name):
            _copy_samples(labels, _Samples(y, n), None, f"{labels_name}: label data")
            _expect_end(labels, labels_name)


def _convert_mnist(sources: Mapping[str, str], out: h5py.File, progress: bool) -> None:
    """MNIST and Fashion-MNIST (same file names and format) -> ``/mnist``."""
    group = out.require_group("mnist")
    with _progress("mnist", progress, 0) as bar:
        for split, names in _MNIST_SPLITS.items():
            paths = (_source(sources, names[0]), _source(sources, names[1]))
            _convert_mnist_split(group, split, paths, bar)


# --- MAT v5 (SVHN) --------------------------------------------------------------------------

_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MX_DTYPES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_MX_KINDS = {1: "cell", 2: "struct", 3: "object", 4: "char", 5: "sparse", 16: "function handle", 17: "opaque"}
_MI_INT8, _MI_UINT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 2, 5, 6, 14, 15
_MX_COMPLEX_FLAG = 0x0800
_MAX_HEADER_ELEMENT = 2**20


class _LimitedReader:
    """The next ``nbytes`` of a file (one uncompressed top-level element)."""

    def __init__(self, f: io.BufferedReader, nbytes: int):
        self._f, self._left = f, nbytes

    def readinto(self, buffer: memoryview, /) -> int:
        n = min(len(buffer), self._left)
        got = self._f.readinto(buffer[:n]) if n else 0
        self._left -= got
        return got


class _InflateReader:
    """One miCOMPRESSED element, decompressed on demand and never more than asked for."""

    def __init__(self, f: io.BufferedReader, nbytes: int, what: str):
        self._f, self._left, self._what = f, nbytes, what
        self._z = zlib.decompressobj()
        self._tail = b""

    def readinto(self, buffer: memoryview, /) -> int:
        while True:
            if not self._tail and self._left > 0 and not self._z.eof:
                self._tail = self._f.read(min(self._left, _PIECE))
                if not self._tail:
                    raise FormatError(f"{self._what} is truncated inside a compressed element")
                self._left -= len(self._tail)
            try:
                data = self._z.decompress(self._tail, len(buffer))
            except zlib.error as exc:
                raise FormatError(f"{self._what}: corrupt compressed element ({exc})") from exc
            self._tail = self._z.unconsumed_tail
            if data:
                buffer[: len(data)] = data
                return len(data)
            if self._z.eof or (not self._tail and self._left == 0):
                return 0


@dataclasses.dataclass
class MatVariable:
    """One real numeric array of a MAT v5 file whose data has not been read yet.

    ``dtype`` is the array's MATLAB class (what ``scipy.io.loadmat`` returns); ``stored`` is
    the dtype of the bytes in the file, which MATLAB may narrow (a double array of small
    integers can be stored as uint8). Data comes in Fortran (column-major) order through
    :meth:`read_into`; it must be read before the iterator moves to the next variable.
    """

    name: str
    dtype: np.dtype
    stored: np.dtype
    dims: tuple[int, ...]
    reader: _Reader | None
    what: str

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    def read_into(self, out: np.ndarray) -> None:
        """Fill ``out`` (contiguous, dtype ``stored``) with the next ``out.size`` elements."""
        if self.reader is None:
            raise RuntimeError(f"{self.what}: the MAT file has moved past this variable")
        _fill(self.reader, out, self.what)

    def read(self, count: int) -> np.ndarray:
        """The next ``count`` elements, converted to the variable's class dtype."""
        out = np.empty(count, self.stored)
        self.read_into(out)
        return out.astype(self.dtype)


def _mat_header(f: io.BufferedReader, filename: str) -> str:
    """Check the 128-byte MAT v5 header and return the byte order of the file's numbers."""
    head = f.read(128)
    if head.startswith(b"MATLAB 7.3") or head[124:126] in (b"\x00\x02", b"\x02\x00"):
        raise FormatError(f"{filename}: MAT v7.3 is not supported (it is HDF5-based); save with -v7")
    if len(head) < 128 or head[126:128] not in (b"IM", b"MI"):
        raise FormatError(f"{filename}: not a MAT v5 file (no 128-byte header with endianness mark)")
    order = "<" if head[126:128] == b"IM" else ">"
    (version,) = struct.unpack(order + "H", head[124:126])
    if version != 0x0100:
        raise FormatError(f"{filename}: MAT version 0x{version:04x} is not supported (expected v5)")
    return order


def _mat_tag(reader: _Reader, order: str, what: str) -> tuple[int, int, bytes | None]:
    """(type, nbytes, data if packed in the tag: the small data element format)."""
    raw = _read_exact(reader, 8, f"{what}: data element tag")
    first, second = struct.unpack(order + "II", raw)
    if first >> 16:
        nbytes = first >> 16
        if nbytes > 4:
            raise FormatError(f"{what}: small data element claims {nbytes} bytes (at most 4)")
        return first & 0xFFFF, nbytes, raw[4 : 4 + nbytes]
    return first, second, None


def _mat_element(reader: _Reader, order: str, what: str, types: tuple[int, ...]) -> bytes:
    """A small header sub-element (flags, dims, name) of one of ``types``, padding skipped."""
    mtype, nbytes, small = _mat_tag(reader, order, what)
    if mtype not in types:
        raise FormatError(f"{what}: data element of type {mtype} where {types} was expected")
    if small is not None:
        return small
    if nbytes > _MAX_HEADER_ELEMENT:
        raise FormatError(f"{what}: header element of {nbytes} bytes is implausibly large")
    data = _read_exact(reader, nbytes + (-nbytes) % 8, what)
    return data[:nbytes]


def _mat_matrix(reader: _Reader, order: str, what: str) -> MatVariable:
    """Parse an miMATRIX up to its real-part tag, leaving ``reader`` at the first data byte."""
    flags = _mat_element(reader, order, what, (_MI_UINT32,))
    dims_raw = _mat_element(reader, order, what, (_MI_INT32,))
    name = _mat_element(reader, order, what, (_MI_INT8, _MI_UINT8)).decode("latin1")
    what = f"{what} variable {name!r}"
    if len(flags) != 8 or len(dims_raw) % 4:
        raise FormatError(f"{what}: malformed array flags or dimensions")
    (word,) = struct.unpack(order + "I", flags[:4])
    dims = struct.unpack(f"{order}{len(dims_raw) // 4}i", dims_raw)
    mx = word & 0xFF
    if mx not in _MX_DTYPES:
        raise FormatError(
            f"{what} is a MATLAB {_MX_KINDS.get(mx, f'class {mx}')} array; only numeric supported"
        )
    if word & _MX_COMPLEX_FLAG:
        raise FormatError(f"{what} is complex; only real arrays are supported")
    if len(dims) < 2 or min(dims) < 0:
        raise FormatError(f"{what} has invalid dimensions {dims}")
    mtype, nbytes, small = _mat_tag(reader, order, what)
    if mtype not in _MI_DTYPES:
        raise FormatError(f"{what}: real part has data type {mtype}, which is not numeric")
    stored = np.dtype(order + _MI_DTYPES[mtype])
    if nbytes != math.prod(dims) * stored.itemsize:
        raise FormatError(f"{what}: real part holds {nbytes} bytes for dimensions {dims}")
    data_reader: _Reader = io.BytesIO(small) if small is not None else reader
    return MatVariable(name, np.dtype(_MX_DTYPES[mx]), stored, tuple(dims), data_reader, what)


def _mat_element_reader(
    f: io.BufferedReader, filename: str, order: str, size: int
) -> tuple[_Reader, int] | None:
    """(reader over the next top-level element's miMATRIX content, end offset); None at the end.

    No padding follows a top-level element: miCOMPRESSED sizes are exact (as scipy reads them).
    """
    while True:
        start = f.tell()
        tag = f.read(8)
        if not tag:
            return None
        if len(tag) < 8:
            raise FormatError(f"{filename}: truncated data element tag at byte {start}")
        mtype, nbytes = struct.unpack(order + "II", tag)
        end = start + 8 + nbytes
        if end > size:
            raise FormatError(f"{filename} is truncated: element at byte {start} needs {nbytes} bytes")
        if mtype != _MI_MATRIX or nbytes:
            break  # an empty miMATRIX holds no variable: skip it
    if mtype == _MI_MATRIX:
        return _LimitedReader(f, nbytes), end
    if mtype != _MI_COMPRESSED:
        raise FormatError(f"{filename}: top-level data element of type {mtype} is not a matrix")
    inflated = _InflateReader(f, nbytes, filename)
    inner, _, _ = _mat_tag(inflated, order, filename)
    if inner != _MI_MATRIX:
        raise FormatError(f"{filename}: compressed element holds type {inner}, not a matrix")
    return inflated, end


def iter_mat_variables(path: str) -> Generator[MatVariable, None, None]:
    """Yield each variable of a MAT v5 file (compressed or not) without loading its data.

    Each variable must be read (or ignored) before asking for the next: the file is a single
    stream. Use ``contextlib.closing`` if you may stop early, so the file is closed at once.
    """
    filename = os.path.basename(path)
    with open(path, "rb") as f:
        order = _mat_header(f, filename)
        size = os.fstat(f.fileno()).st_size
        while (element := _mat_element_reader(f, filename, order, size)) is not None:
            reader, end = element
            var = _mat_matrix(reader, order, filename)
            try:
                yield var
            finally:
                var.reader = None
            f.seek(end)


# --- SVHN -----------------------------------------------------------------------------------


def _svhn_images(var: MatVariable, group: h5py.Group, name: str, bar: tqdm) -> int:
    """Stream X (32, 32, 3, N), Fortran order: each sample is 3072 contiguous bytes (C, W, H)."""
    if len(var.dims) != 4 or var.dims[:3] != (32, 32, 3):
        raise FormatError(f"{var.what} has dimensions {var.dims}, expected (32, 32, 3, N)")
    n = var.dims[3]
    _grow_total(bar, n)
    dset = _new_dataset(group, name, (n, 3, 32, 32), np.uint8)
    assert var.reader is not None
    _copy_samples(var.reader, _Samples(dset, n, stored=var.stored, transpose_hw=True), bar, var.what)
    return n


def _svhn_labels(var: MatVariable, group: h5py.Group, name: str) -> int:
    """y (N, k): batchup keeps column 0 (the first N elements), as int32, with 10 -> 0."""
    if len(var.dims) != 2 or var.dims[1] < 1:
        raise FormatError(f"{var.what} has dimensions {var.dims}, expected (N, 1)")
    n = var.dims[0]
    dset = _new_dataset(group, name, (n,), np.int32)
    per_chunk = max(1, _CHUNK_BYTES // 8)
    for i in range(0, n, per_chunk):
        k = min(per_chunk, n - i)
        y = var.read(k).astype(np.int32)
        y[y == 10] = 0
        dset[i : i + k] = y
    return n


def _convert_svhn_mat(path: str, group: h5py.Group, prefix: str, bar: tqdm) -> None:
    counts: dict[str, int] = {}
    filename = os.path.basename(path)
    with contextlib.closing(iter_mat_variables(path)) as variables:
        for var in variables:
            if var.name == "X" and "X" not in counts:
                counts["X"] = _svhn_images(var, group, f"{prefix}_X_u8", bar)
            elif var.name == "y" and "y" not in counts:
                counts["y"] = _svhn_labels(var, group, f"{prefix}_y")
    for missing in {"X", "y"} - counts.keys():
        raise FormatError(f"{filename}: no variable {missing!r}")
    if counts["X"] != counts["y"]:
        raise FormatError(f"{filename}: {counts['X']} images but {counts['y']} labels")


def _convert_svhn_train_test(sources: Mapping[str, str], out: h5py.File, progress: bool) -> None:
    """``train_32x32.mat`` and ``test_32x32.mat`` -> ``/svhn`` train/test arrays."""
    group = out.require_group("svhn")
    with _progress("svhn", progress, 0) as bar:
        _convert_svhn_mat(_source(sources, "train_32x32.mat"), group, "train", bar)
        _convert_svhn_mat(_source(sources, "test_32x32.mat"), group, "test", bar)


def _convert_svhn_extra(sources: Mapping[str, str], out: h5py.File, progress: bool) -> None:
    """``extra_32x32.mat`` -> ``/svhn/extra_X_u8``, ``/svhn/extra_y`` (uncompressed, unlike batchup)."""
    with _progress("svhn extra", progress, 0) as bar:
        _convert_svhn_mat(_source(sources, "extra_32x32.mat"), out.require_group("svhn"), "extra", bar)


# --- tarballs and CIFAR pickles -------------------------------------------------------------


def _numpy_core(module: str) -> Any:
    """numpy 2 moved ``numpy.core`` to ``numpy._core``; importing the old name warns."""
    try:
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:  # numpy < 2
        return importlib.import_module(f"numpy.core.{module}")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Everything a CIFAR batch pickle (Python 2 or 3, any numpy) needs to rebuild arrays."""
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # protocol-2 pickles of bytes made by Python 3
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


_PICKLE_ALLOWED = _allowed_globals()


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global but numpy's array reconstruction: a pickle can run any callable."""

    def __init__(self, file: io.BufferedReader, what: str):
        super().__init__(file, encoding="latin1")
        self._what = what

    def find_class(self, module_name: str, global_name: str, /) -> Any:
        found = _PICKLE_ALLOWED.get((module_name, global_name))
        if found is None:
            raise FormatError(
                f"{self._what}: pickle refers to {module_name}.{global_name}, which a CIFAR batch "
                "never needs; refusing to load it"
            )
        return found


def _load_pickle(fobj: io.BufferedReader, what: str) -> dict[str, Any]:
    try:
        obj = _CifarUnpickler(fobj, what).load()
    except FormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise FormatError(f"{what}: not a readable pickle ({exc!r})") from exc
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: pickle holds a {type(obj).__name__}, expected a dict")
    return obj


@dataclasses.dataclass
class _CifarBatch:
    images: np.ndarray  # (N, 3, 32, 32) uint8
    labels: dict[str, np.ndarray]  # key in the pickle -> (N,) int32


def _cifar_batch(obj: dict[str, Any], what: str, label_keys: tuple[str, ...]) -> _CifarBatch:
    """Check a batch dict as batchup reads it: ``data.reshape(-1, 3, 32, 32)``, int32 labels."""
    data = obj.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size % 3072:
        raise FormatError(f"{what}: 'data' is not a uint8 array of 3x32x32 images")
    images = data.reshape(-1, 3, 32, 32)
    labels = {}
    for key in label_keys:
        try:
            labels[key] = np.array(obj[key], dtype=np.int32)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise FormatError(f"{what}: {key!r} is missing or not a list of integers") from exc
        if labels[key].shape != (len(images),):
            raise FormatError(f"{what}: {key!r} has shape {labels[key].shape} for {len(images)} images")
    return _CifarBatch(images, labels)


def _tar_files(tar: tarfile.TarFile, wanted: set[str]) -> Iterator[tuple[str, io.BufferedReader, int]]:
    """(name, stream, size) of each wanted regular member, in archive order (stream mode)."""
    for member in tar:
        name = member.name.removeprefix("./")
        if name in wanted and member.isfile():
            fobj = cast(io.BufferedReader, tar.extractfile(member))  # an ExFileObject: regular file
            with fobj:
                yield name, fobj, member.size


@contextlib.contextmanager
def _open_tar(path: str) -> Iterator[tarfile.TarFile]:
    """Stream mode: members are decompressed once, in order, and never extracted to disk.

    gzip is undone by ``gzip.GzipFile``, which never inflates more than it is asked for, rather
    than by tarfile's "r|gz", which inflates whole input blocks: with a highly compressible
    member one block can expand a thousandfold.
    """
    with gzip.open(path, "rb") as gz, tarfile.open(fileobj=gz, mode="r|", bufsize=_PIECE) as tar:
        yield tar


def _require_all(filename: str, wanted: set[str], seen: set[str]) -> None:
    if missing := sorted(wanted - seen):
        raise FormatError(f"{filename}: missing member(s) {', '.join(missing)}")


def _write_batch(group: h5py.Group, prefix: str, batch: _CifarBatch, start: int, bar: tqdm) -> None:
    """Write a loaded batch at ``start`` of its split's datasets, in bounded slices."""
    n = len(batch.images)
    per_chunk = max(1, _CHUNK_BYTES // 3072)
    for i in range(0, n, per_chunk):
        group[f"{prefix}_X_u8"][start + i : start + min(n, i + per_chunk)] = batch.images[i : i + per_chunk]
        bar.update(min(per_chunk, n - i))
    for key, labels in batch.labels.items():
        suffix = "_coarse" if key == "coarse_labels" else ""
        group[f"{prefix}_y{suffix}"][start : start + n] = labels


def _create_split(group: h5py.Group, prefix: str, n: int, label_keys: tuple[str, ...]) -> None:
    _new_dataset(group, f"{prefix}_X_u8", (n, 3, 32, 32), np.uint8)
    for key in label_keys:
        _new_dataset(group, f"{prefix}_y" + ("_coarse" if key == "coarse_labels" else ""), (n,), np.int32)


_CIFAR10_TARBALL = "cifar-10-python.tar.gz"
_CIFAR10_TRAIN = tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST = "cifar-10-batches-py/test_batch"
_CIFAR10_LABELS = ("labels",)


def _cifar10_counts(path: str) -> dict[str, int]:
    """First pass: samples per batch, since the tarball stores data_batch_1..5 out of order."""
    counts: dict[str, int] = {}
    wanted = set(_CIFAR10_TRAIN) | {_CIFAR10_TEST}
    with _open_tar(path) as tar:
        for name, fobj, _ in _tar_files(tar, wanted - counts.keys()):
            what = f"{_CIFAR10_TARBALL}: {name}"
            counts[name] = len(_cifar_batch(_load_pickle(fobj, what), what, _CIFAR10_LABELS).images)
    _require_all(_CIFAR10_TARBALL, wanted, set(counts))
    return counts


def _convert_cifar10(sources: Mapping[str, str], out: h5py.File, progress: bool) -> None:
    """Two streamed passes: count each batch, then write it at its offset in ``train_*``."""
    path = _source(sources, _CIFAR10_TARBALL)
    group = out.require_group("cifar10")
    with _decoding_errors(_CIFAR10_TARBALL):
        counts = _cifar10_counts(path)
        starts = {name: sum(counts[b] for b in _CIFAR10_TRAIN[:i]) for i, name in enumerate(_CIFAR10_TRAIN)}
        starts[_CIFAR10_TEST] = 0
        _create_split(group, "train", sum(counts[b] for b in _CIFAR10_TRAIN), _CIFAR10_LABELS)
        _create_split(group, "test", counts[_CIFAR10_TEST], _CIFAR10_LABELS)
        done: set[str] = set()
        with _progress("cifar10", progress, sum(counts.values())) as bar, _open_tar(path) as tar:
            for name, fobj, _ in _tar_files(tar, set(starts)):
                if name in done:
                    continue
                what = f"{_CIFAR10_TARBALL}: {name}"
                batch = _cifar_batch(_load_pickle(fobj, what), what, _CIFAR10_LABELS)
                if len(batch.images) != counts[name]:
                    raise FormatError(f"{what}: changed between two reads of the tarball")
                prefix = "test" if name == _CIFAR10_TEST else "train"
                _write_batch(group, prefix, batch, starts[name], bar)
                done.add(name)


_CIFAR100_TARBALL = "cifar-100-python.tar.gz"
_CIFAR100_SPLITS = {"cifar-100-python/train": "train", "cifar-100-python/test": "test"}
_CIFAR100_META = "cifar-100-python/meta"
_CIFAR100_LABELS = ("fine_labels", "coarse_labels")


def _class_names(names: Any, what: str) -> np.ndarray:
    """Byte strings as batchup stores them (readers decode latin1); str names encode latin1."""
    if not isinstance(names, list | tuple) or not names:
        raise FormatError(f"{what}: class names are not a non-empty list")
    try:
        return np.array([n.encode("latin1") if isinstance(n, str) else bytes(n) for n in names], dtype="S")
    except (TypeError, UnicodeEncodeError) as exc:
        raise FormatError(f"{what}: class names are not strings ({exc})") from exc


def _cifar100_meta(fobj: io.BufferedReader, group: h5py.Group) -> None:
    what = f"{_CIFAR100_TARBALL}: {_CIFAR100_META}"
    meta = _load_pickle(fobj, what)
    group.create_dataset("class_names", data=_class_names(meta.get("fine_label_names"), what))
    group.create_dataset("class_names_coarse", data=_class_names(meta.get("coarse_label_names"), what))


def _convert_cifar100(sources: Mapping[str, str], out: h5py.File, progress: bool) -> None:
    """One streamed pass: each split is a single pickle, so its size is known once loaded."""
    path = _source(sources, _CIFAR100_TARBALL)
    group = out.require_group("cifar100")
    wanted = set(_CIFAR100_SPLITS) | {_CIFAR100_META}
    seen: set[str] = set()
    with _decoding_errors(_CIFAR100_TARBALL), _progress("cifar100", progress, 0) as bar:
        with _open_tar(path) as tar:
            for name, fobj, _ in _tar_files(tar, wanted):
                if name in seen:
                    continue
                seen.add(name)
                if name == _CIFAR100_META:
                    _cifar100_meta(fobj, group)
                    continue
                what = f"{_CIFAR100_TARBALL}: {name}"
                batch = _cifar_batch(_load_pickle(fobj, what), what, _CIFAR100_LABELS)
                _grow_total(bar, len(batch.images))
                _create_split(group, _CIFAR100_SPLITS[name], len(batch.images), _CIFAR100_LABELS)
                _write_batch(group, _CIFAR100_SPLITS[name], batch, 0, bar)
                del batch
    _require_all(_CIFAR100_TARBALL, wanted, seen)


# --- STL-10 ---------------------------------------------------------------------------------

_STL_TARBALL = "stl10_binary.tar.gz"
_STL_DIR = "stl10_binary/"
_STL_IMAGES = {"train_X.bin": "train_X_u8", "test_X.bin": "test_X_u8", "unlabeled_X.bin": "unl_X_u8"}
_STL_LABELS = {"train_y.bin": "train_y", "test_y.bin": "test_y"}
_STL_TEXT = ("class_names.txt", "fold_indices.txt")
_STL_SAMPLE = (3, 96, 96)
_STL_SAMPLE_BYTES = math.prod(_STL_SAMPLE)


def _stl_images(fobj: io.BufferedReader, size: int, group: h5py.Group, member: str, bar: tqdm) -> None:
    """Column-major images: N from the member size, streamed with each image's H/W swapped."""
    what = f"{_STL_TARBALL}: {_STL_DIR}{member}"
    if size % _STL_SAMPLE_BYTES:
        raise FormatError(f"{what}: size {size} is not a multiple of {_STL_SAMPLE_BYTES} (one 3x96x96 image)")
    n = size // _STL_SAMPLE_BYTES
    _grow_total(bar, n)
    dset = _new_dataset(group, _STL_IMAGES[member], (n,) + _STL_SAMPLE, np.uint8)
    _copy_samples(fobj, _Samples(dset, n, transpose_hw=True), bar, what)


def _stl_labels(fobj: io.BufferedReader, size: int, group: h5py.Group, member: str) -> None:
    """uint8 labels 1..10 stored minus 1 as int32, exactly as batchup (no range check)."""
    raw = np.frombuffer(_read_exact(fobj, size, f"{_STL_TARBALL}: {_STL_DIR}{member}"), np.uint8)
    group.create_dataset(_STL_LABELS[member], data=raw.astype(np.int32) - 1)


def _text_lines(data: bytes, what: str) -> list[str]:
    """``open(path, 'r').readlines()`` as batchup reads them: universal newlines, ASCII."""
    try:
        return io.StringIO(data.decode("ascii"), newline=None).readlines()
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what}: not ASCII text ({exc})") from exc


def _stl_folds(text: bytes, n_train: int) -> list[np.ndarray]:
    what = f"{_STL_TARBALL}: {_STL_DIR}fold_indices.txt"
    try:
        folds = [np.array([int(x) for x in line.split()], dtype=np.int64) for line in _text_lines(text, what)]
    except ValueError as exc:
        raise FormatError(f"{what}: a fold is not a list of integers ({exc})") from exc
    for i, fold in enumerate(folds):
        if fold.size and (fold.min() < 0 or fold.max() >= n_train):
            raise FormatError(f"{what}: fold {i} has indices outside the {n_train} training images")
    return [fold.astype(np.int32) for fold in folds]


def _stl_text(group: h5py.Group, texts: dict[str, bytes]) -> None:
    """class_names (fixed-length bytes) and fold_indices (variable-length int32 rows)."""
    what = f"{_STL_TARBALL}: {_STL_DIR}class_names.txt"
    names = [line.strip().encode("ascii") for line in _text_lines(texts["class_names.txt"], what)]
    group.create_dataset("class_names", data=_class_names(names, what))
    folds = _stl_folds(texts["fold_indices.txt"], group["train_y"].shape[0])
    dset = group.create_dataset("fold_indices", shape=(len(folds),), dtype=h5py.vlen_dtype(np.int32))
    for i, fold in enumerate(folds):
        dset[i] = fold


def _stl_check_counts(group: h5py.Group) -> None:
    for split in ("train", "test"):
        n_x, n_y = group[f"{split}_X_u8"].shape[0], group[f"{split}_y"].shape[0]
        if n_x != n_y:
            raise FormatError(f"{_STL_TARBALL}: {n_x} {split} images but {n_y} {split} labels")


def _convert_stl(sources: Mapping[str, str], out: h5py.File, progress: bool) -> None:
    """One streamed pass in archive order; the small text members are buffered until the end."""
    path = _source(sources, _STL_TARBALL)
    group = out.require_group("stl")
    wanted = {_STL_DIR + m for m in (*_STL_IMAGES, *_STL_LABELS, *_STL_TEXT)}
    seen: set[str] = set()
    texts: dict[str, bytes] = {}
    with _decoding_errors(_STL_TARBALL), _progress("stl", progress, 0) as bar, _open_tar(path) as tar:
        for name, fobj, size in _tar_files(tar, wanted):
            member = name.removeprefix(_STL_DIR)
            if name in seen:
                raise FormatError(f"{_STL_TARBALL}: member {name} appears twice")
            seen.add(name)
            if member in _STL_IMAGES:
                _stl_images(fobj, size, group, member, bar)
            elif member in _STL_LABELS:
                _stl_labels(fobj, size, group, member)
            elif size > _MAX_HEADER_ELEMENT:
                raise FormatError(f"{_STL_TARBALL}: {name} is implausibly large ({size} bytes)")
            else:
                texts[member] = _read_exact(fobj, size, f"{_STL_TARBALL}: {name}")
    _require_all(_STL_TARBALL, wanted, seen)
    _stl_check_counts(group)
    _stl_text(group, texts)


def read_fold_indices(group: h5py.Group) -> list[np.ndarray]:
    """STL's folds as batchup's ``STL.tr_folds``: a list of int32 index arrays, one per fold.

    Written as a variable-length int32 dataset; a 2-D int32 dataset (equal rows) is read too.
    """
    return [np.asarray(row, dtype=np.int32) for row in group["fold_indices"][...]]


# --- USPS -----------------------------------------------------------------------------------

_USPS_FILE = "usps.h5"
_USPS_ARRAYS = {
    "train_X": (np.float32, (1, 16, 16)),
    "train_y": (np.int32, ()),
    "test_X": (np.float32, (1, 16, 16)),
    "test_y": (np.int32, ()),
}


def _usps_source(src: h5py.File, name: str) -> h5py.Dataset:
    dtype, sample = _USPS_ARRAYS[name]
    node = src.get(f"usps/{name}")
    if not isinstance(node, h5py.Dataset):
        raise FormatError(f"{_USPS_FILE}: no dataset /usps/{name}")
    if node.dtype != dtype or node.ndim != 1 + len(sample) or tuple(node.shape[1:]) != sample:
        raise FormatError(
            f"{_USPS_FILE}: /usps/{name} is {node.dtype}{node.shape}, expected {np.dtype(dtype)}(N, *{sample})"
        )
    return node


def _convert_usps(sources: Mapping[str, str], out: h5py.File, progress: bool) -> None:
    """Copy the four blosc-compressed PyTables arrays into uncompressed contiguous datasets."""
    import hdf5plugin  # noqa: F401  (registers the blosc filter the source arrays need)

    group = out.require_group("usps")
    try:
        src = h5py.File(_source(sources, _USPS_FILE), "r")
    except OSError as exc:
        raise FormatError(f"{_USPS_FILE}: not an HDF5 file ({exc})") from exc
    with src, _progress("usps", progress, 0) as bar:
        nodes = {name: _usps_source(src, name) for name in _USPS_ARRAYS}
        for name, node in nodes.items():
            n = node.shape[0]
            dset = _new_dataset(group, name, node.shape, node.dtype)
            per_chunk = max(1, _CHUNK_BYTES // max(1, node.dtype.itemsize * math.prod(node.shape[1:])))
            if name.endswith("_X"):
                _grow_total(bar, n)
            for i in range(0, n, per_chunk):
                dset[i : i + per_chunk] = node[i : i + per_chunk]
                if name.endswith("_X"):
                    bar.update(min(per_chunk, n - i))


CONVERTERS: dict[str, ConvertFn] = {
    "mnist": _convert_mnist,
    "svhn_train_test": _convert_svhn_train_test,
    "svhn_extra": _convert_svhn_extra,
    "cifar10": _convert_cifar10,
    "cifar100": _convert_cifar100,
    "stl": _convert_stl,
    "usps": _convert_usps,
}
