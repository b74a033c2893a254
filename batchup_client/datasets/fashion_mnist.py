"""Drop-in for ``batchup.datasets.fashion_mnist``."""

from __future__ import annotations

from ._remote import TrainValTest

__all__ = ["FashionMNIST"]


class FashionMNIST(TrainValTest):
    """Fashion-MNIST, with MNIST's attributes and split rule."""

    _dataset = "fashion_mnist"
    _error = "Could not load Fashion MNIST dataset"
