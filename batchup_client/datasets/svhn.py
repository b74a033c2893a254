"""Drop-in for ``batchup.datasets.svhn``."""

from __future__ import annotations

from typing import Any

from ._remote import TrainValTest, open_split

__all__ = ["SVHN", "SVHNExtra"]


class SVHN(TrainValTest):
    """SVHN train/val/test: ``*_X_u8`` (N,3,32,32) uint8, ``*_y`` int32 (digit 0 is 0),
    ``*_X`` float32; the last ``n_val`` training samples are ``val_*``."""

    _dataset = "svhn"
    _error = "Could not load SVHN dataset"


class SVHNExtra:
    """SVHN's extra training set: ``X_u8``, ``y`` and ``X`` (float32)."""

    def __init__(
        self, val_lower: float = 0.0, val_upper: float = 1.0, *, client: Any = None, wait: float | None = None
    ):
        split = open_split(
            "svhn_extra",
            "extra",
            "Could not load SVHN extra dataset",
            client,
            wait,
            val_lower=val_lower,
            val_upper=val_upper,
        )
        self.X_u8, self.y, self.X = split["X_u8"], split["y"], split["X"]
