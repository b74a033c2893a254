"""The standard datasets batchup 0.2.3 knows: source files, mirrors, checksums, layouts, splits.

Everything here is data. The HDF5 layout (group and array names) and the split rules are
batchup's, so a file converted here and one converted by batchup hold the same arrays.
"""

from __future__ import annotations

import dataclasses

__all__ = ["DATASETS", "DatasetInfo", "SourceFile", "UnknownDatasetError", "lookup"]


class UnknownDatasetError(KeyError):
    """No standard dataset has that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One original file of a dataset: its name and expected SHA-256."""

    filename: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A standard dataset: where to get it, how to convert it, how its splits are cut."""

    name: str  #: the name clients and ``batchup-server fetch`` use
    title: str
    h5_filename: str  #: batchup's cache file name under ``<home>/data/``
    group: str  #: the HDF5 group holding the arrays
    converter: str  #: key of :data:`batchup_server.datasets.formats.CONVERTERS`
    files: tuple[SourceFile, ...]
    mirrors: tuple[str, ...]  #: base URLs, tried in order; a file's URL is base + filename
    splits: dict[str, str]  #: split name -> array prefix in the group ("train", "test", ...)
    labels: tuple[str, ...] = ("y",)  #: label fields of labelled splits
    uint8: bool = True  #: images stored as ``<prefix>_X_u8`` (else float32 ``<prefix>_X``)
    val: str = "n_val"  #: how the validation split is cut: "n_val", "n_val_folds" or ""
    default_val: int = 10000
    class_names: tuple[str, ...] | str | None = None  #: a list, or the name of an array in the file
    class_names_coarse: str | None = None
    download_bytes: int = 0  #: approximate size of the downloads, for ``batchup-server datasets``
    error: str = ""  #: batchup's RuntimeError message when the data cannot be had

    @property
    def labelled_splits(self) -> tuple[str, ...]:
        return tuple(s for s, prefix in self.splits.items() if prefix != "unl")


_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_TRAIN_VAL_TEST = {"train": "train", "val": "train", "test": "test"}
_MiB = 1 << 20

DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo(
            "mnist",
            "MNIST handwritten digits",
            "mnist.h5",
            "mnist",
            "mnist",
            tuple(
                SourceFile(f, h)
                for f, h in zip(
                    _MNIST_FILES,
                    (
                        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                    ),
                )
            ),
            # yann.lecun.com refuses downloads nowadays; these are the mirrors torchvision uses
            (
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "http://yann.lecun.com/exdb/mnist/",
            ),
            _TRAIN_VAL_TEST,
            download_bytes=11 * _MiB,
            error="Could not load MNIST dataset",
        ),
        DatasetInfo(
            "fashion_mnist",
            "Fashion-MNIST (Zalando article images)",
            "fashion-mnist.h5",
            "mnist",
            "mnist",
            tuple(
                SourceFile(f, h)
                for f, h in zip(
                    _MNIST_FILES,
                    (
                        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                    ),
                )
            ),
            ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            _TRAIN_VAL_TEST,
            download_bytes=30 * _MiB,
            error="Could not load Fashion MNIST dataset",
        ),
        DatasetInfo(
            "svhn",
            "SVHN street view house numbers (train and test)",
            "svhn_train_test.h5",
            "svhn",
            "svhn_train_test",
            (
                SourceFile(
                    "train_32x32.mat", "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8"
                ),
                SourceFile(
                    "test_32x32.mat", "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b"
                ),
            ),
            ("http://ufldl.stanford.edu/housenumbers/",),
            _TRAIN_VAL_TEST,
            download_bytes=246 * _MiB,
            error="Could not load SVHN dataset",
        ),
        DatasetInfo(
            "svhn_extra",
            "SVHN extra training set (531,131 less difficult samples)",
            "svhn_extra.h5",
            "svhn",
            "svhn_extra",
            (
                SourceFile(
                    "extra_32x32.mat", "a133a4beb38a00fcdda90c9489e0c04f900b660ce8a316a5e854838379a71eb3"
                ),
            ),
            ("http://ufldl.stanford.edu/housenumbers/",),
            {"extra": "extra"},
            val="",
            default_val=0,
            download_bytes=1268 * _MiB,
            error="Could not load SVHN extra dataset",
        ),
        DatasetInfo(
            "cifar10",
            "CIFAR-10 tiny images, 10 classes",
            "cifar10.h5",
            "cifar10",
            "cifar10",
            (
                SourceFile(
                    "cifar-10-python.tar.gz",
                    "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                ),
            ),
            ("https://www.cs.toronto.edu/~kriz/", "http://www.cs.toronto.edu/~kriz/"),
            _TRAIN_VAL_TEST,
            class_names=(
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ),
            download_bytes=163 * _MiB,
            error="Could not load CIFAR-10 dataset",
        ),
        DatasetInfo(
            "cifar100",
            "CIFAR-100 tiny images, 100 fine and 20 coarse classes",
            "cifar100.h5",
            "cifar100",
            "cifar100",
            (
                SourceFile(
                    "cifar-100-python.tar.gz",
                    "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
                ),
            ),
            ("https://www.cs.toronto.edu/~kriz/", "http://www.cs.toronto.edu/~kriz/"),
            _TRAIN_VAL_TEST,
            labels=("y", "y_coarse"),
            class_names="class_names",
            class_names_coarse="class_names_coarse",
            download_bytes=161 * _MiB,
            error="Could not load CIFAR-10 dataset",  # sic: batchup's message
        ),
        DatasetInfo(
            "stl10",
            "STL-10 96x96 images: 10 classes plus 100,000 unlabelled",
            "stl10.h5",
            "stl",
            "stl",
            (
                SourceFile(
                    "stl10_binary.tar.gz", "f31fd99273a1acb8609c8db427cebb1de3f71de77758cdc0e22956e1289b9866"
                ),
            ),
            ("http://ai.stanford.edu/~acoates/stl10/",),
            {"train": "train", "val": "train", "test": "test", "unlabeled": "unl"},
            val="n_val_folds",
            default_val=1,
            class_names="class_names",
            download_bytes=2516 * _MiB,
            error="Could not load MNIST dataset",  # sic: batchup's message
        ),
        DatasetInfo(
            "usps",
            "USPS handwritten digits (16x16, float32 in [0, 1])",
            "usps.h5",
            "usps",
            "usps",
            (SourceFile("usps.h5", "ba768d9a9b11e79b31c1e40130647c4fc04e6afc1fb41a0d4b9f1176065482b4"),),
            ("https://github.com/Britefury/usps_dataset/raw/master/",),
            _TRAIN_VAL_TEST,
            uint8=False,
            default_val=729,
            download_bytes=1 * _MiB,
            error="Could not load USPS dataset",
        ),
    )
}

_ALIASES = {"fashion-mnist": "fashion_mnist", "stl": "stl10", "svhn-extra": "svhn_extra"}


def lookup(name: str) -> DatasetInfo:
    """The dataset called ``name`` (a few spellings accepted), or :class:`UnknownDatasetError`."""
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    try:
        return DATASETS[key]
    except (KeyError, TypeError):
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}"
        ) from None
