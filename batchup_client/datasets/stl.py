"""Drop-in for ``batchup.datasets.stl``."""

from __future__ import annotations

from typing import Any

from ._remote import ImageDataset, folds, open_split

__all__ = ["STL"]


class STL(ImageDataset):
    """STL-10: ``train_*``/``val_*`` (the last ``n_val_folds`` of the 10 training folds
    are validation), ``test_*``, ``unl_X_u8`` (100,000 unlabelled images), ``tr_folds``
    and ``class_names``. Images are (N,3,96,96)."""

    _dataset = "stl10"
    _error = "Could not load MNIST dataset"  # sic: batchup's message

    def __init__(
        self,
        n_val_folds: int | None = 1,
        val_lower: float = 0.0,
        val_upper: float = 1.0,
        *,
        client: Any = None,
        wait: float | None = None,
    ):
        splits = self._load(
            {"train": "train", "val": "val"},
            client,
            wait,
            n_val_folds=n_val_folds,
            val_lower=val_lower,
            val_upper=val_upper,
        )
        params = {"val_lower": val_lower, "val_upper": val_upper}
        self._set("test", open_split(self._dataset, "test", self._error, client, wait, **params))
        self.unl_X_u8 = open_split(self._dataset, "unlabeled", self._error, client, wait)["X_u8"]
        meta = splits["train"].metadata
        self.tr_folds = folds(meta)
        self.class_names: list[str] = list(meta["class_names"])
