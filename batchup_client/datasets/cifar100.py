"""Drop-in for ``batchup.datasets.cifar100``."""

from __future__ import annotations

from typing import Any

from ._remote import ImageDataset

__all__ = ["CIFAR100"]


class CIFAR100(ImageDataset):
    """CIFAR-100: CIFAR-10's attributes plus ``*_y_coarse`` and ``class_names_coarse``."""

    _dataset = "cifar100"
    _error = "Could not load CIFAR-10 dataset"  # sic: batchup's message
    _labels = ("y", "y_coarse")

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
        meta = splits["train"].metadata
        self.class_names: list[str] = list(meta["class_names"])
        self.class_names_coarse: list[str] = list(meta["class_names_coarse"])
