"""Drop-in for ``batchup.datasets``: the standard datasets, served by a batchup-server.

``from batchup_client.datasets import cifar10; ds = cifar10.CIFAR10(n_val=5000)`` gives
batchup's attributes (``train_X``, ``train_y``, ``val_X``, ..., ``class_names``). They
are :class:`~batchup_client.remote.RemoteArray` fields of the server's copy of the data,
so ``data_source.ArrayDataSource([ds.train_X, ds.train_y])`` streams batches straight
from the server (float32 ``X`` is computed from uint8 in its workers) and nothing is
downloaded into the training process. The server (``$BATCHUP_SERVER``, or a private
local one) fetches the dataset on first use when it is allowed to download; the
embedded local server always is, as batchup.
"""

from . import cifar10, cifar100, fashion_mnist, mnist, stl, svhn, usps

__all__ = ["cifar10", "cifar100", "fashion_mnist", "mnist", "stl", "svhn", "usps"]
