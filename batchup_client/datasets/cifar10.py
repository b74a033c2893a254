"""Drop-in for ``batchup.datasets.cifar10``."""

from __future__ import annotations

from typing import Any

from ._remote import TrainValTest

__all__ = ["CIFAR10"]


class CIFAR10(TrainValTest):
    """CIFAR-10: ``train_X_u8`` (N,3,32,32) uint8, ``train_y``, ``train_X`` float32,
    ``val_*`` (the last ``n_val`` training samples), ``test_*`` and ``class_names``."""

    _dataset = "cifar10"
    _error = "Could not load CIFAR-10 dataset"

    def _metadata(self, metadata: dict[str, Any]) -> None:
        self.class_names: list[str] = list(metadata["class_names"])
