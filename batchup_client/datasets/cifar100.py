"""Drop-in for ``batchup.datasets.cifar100``."""

from __future__ import annotations

from typing import Any

from ._remote import TrainValTest

__all__ = ["CIFAR100"]


class CIFAR100(TrainValTest):
    """CIFAR-100: CIFAR-10's attributes plus ``*_y_coarse`` and ``class_names_coarse``."""

    _dataset = "cifar100"
    _error = "Could not load CIFAR-10 dataset"  # sic: batchup's message
    _labels = ("y", "y_coarse")

    def _metadata(self, metadata: dict[str, Any]) -> None:
        self.class_names: list[str] = list(metadata["class_names"])
        self.class_names_coarse: list[str] = list(metadata["class_names_coarse"])
