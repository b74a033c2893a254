"""Drop-in for ``batchup.datasets.mnist``."""

from __future__ import annotations

from typing import Any

from ._remote import ImageDataset

__all__ = ["MNIST"]


class _MNISTLike(ImageDataset):
    def __init__(
        self,
        n_val: int | None = 10000,
        val_lower: float = 0.0,
        val_upper: float = 1.0,
        *,
        client: Any = None,
        wait: float | None = None,
    ):
        self._load(
            {"train": "train", "val": "val", "test": "test"},
            client,
            wait,
            n_val=n_val,
            val_lower=val_lower,
            val_upper=val_upper,
        )


class MNIST(_MNISTLike):
    """MNIST digits: ``train_X_u8`` (N,1,28,28) uint8, ``train_y`` int32, ``train_X``
    float32 in ``[val_lower, val_upper]``; the last ``n_val`` training samples are ``val_*``."""

    _dataset = "mnist"
    _error = "Could not load MNIST dataset"
