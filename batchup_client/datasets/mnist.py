"""Drop-in for ``batchup.datasets.mnist``."""

from __future__ import annotations

from ._remote import TrainValTest

__all__ = ["MNIST"]


class MNIST(TrainValTest):
    """MNIST digits: ``train_X_u8`` (N,1,28,28) uint8, ``train_y`` int32, ``train_X``
    float32 in ``[val_lower, val_upper]``; the last ``n_val`` training samples are ``val_*``."""

    _dataset = "mnist"
    _error = "Could not load MNIST dataset"
