"""Drop-in for ``batchup.datasets.cifar10``."""

from __future__ import annotations

from typing import Any

from ._remote import ImageDataset

__all__ = ["CIFAR10"]


class CIFAR10(ImageDataset):
    """CIFAR-10: ``train_X_u8`` (N,3,32,32) uint8, ``train_y``, ``train_X`` float32,
    ``val_*`` (the last ``n_val`` training samples), ``test_*`` and ``class_names``."""

    _dataset = "cifar10"
    _error = "Could not load CIFAR-10 dataset"

    def __init__(
        self,
        n_val: int | None = 10000,
        val_lower: float = 0.0,
        val_upper: float = 1.0,
        *,
        client: Any = None,
        wait: float | None = None,
    ):
        splits = self._load(
            {"train": "train", "val": "val", "test": "test"},
            client,
            wait,
            n_val=n_val,
            val_lower=val_lower,
            val_upper=val_upper,
        )
        self.class_names: list[str] = list(splits["train"].metadata["class_names"])
