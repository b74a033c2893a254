"""Drop-in for ``batchup.datasets.usps``."""

from __future__ import annotations

from typing import Any

from ._remote import ImageDataset

__all__ = ["USPS"]


class USPS(ImageDataset):
    """USPS digits: ``train_X`` (N,1,16,16) float32 in [0, 1], ``train_y`` int32, and the
    same for ``val_*`` (the last ``n_val`` training samples) and ``test_*``."""

    _dataset = "usps"
    _error = "Could not load USPS dataset"

    def __init__(self, n_val: int | None = 729, *, client: Any = None, wait: float | None = None):
        self._load({"train": "train", "val": "val", "test": "test"}, client, wait, n_val=n_val)
