"""What every drop-in dataset class does: ask the server for each split's fields."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DatasetUnavailableError
from ..remote import RemoteArray

__all__ = ["ImageDataset", "RemoteSplit", "TrainValTest", "open_split"]


class RemoteSplit:
    """One split of a dataset on a server: its fields as :class:`RemoteArray` and metadata."""

    def __init__(self, arrays: dict[str, RemoteArray], metadata: dict[str, Any]):
        self.arrays = arrays
        self.metadata = metadata

    def __getitem__(self, field: str) -> RemoteArray:
        return self.arrays[field]


def open_split(
    dataset: str, split: str, error: str, client: Any = None, wait: float | None = None, **params: Any
) -> RemoteSplit:
    """Describe ``dataset``'s ``split`` (waiting while the server fetches it).

    A dataset the server cannot provide raises :class:`DatasetUnavailableError` (a
    ``RuntimeError``, as batchup's classes raise) whose message starts with batchup's
    (``error``) and goes on with the server's reason.
    """
    if client is None:
        from .. import default_client

        client = default_client()
    ref = {"name": dataset, "params": {"split": split, **params}}
    try:
        info = client.describe(ref, wait)
    except DatasetUnavailableError as exc:
        raise DatasetUnavailableError(exc.code, f"{error}: {exc}") from exc
    arrays = {f["name"]: RemoteArray(client, ref, f["name"], info.length, f) for f in info.fields}
    return RemoteSplit(arrays, dict(info.metadata))


class ImageDataset:
    """Sets batchup's attributes ``<split>_X_u8``, ``<split>_y``, ``<split>_X`` (float32 in
    ``[val_lower, val_upper]``) for the given splits."""

    _dataset = ""
    _error = ""
    _labels: tuple[str, ...] = ("y",)

    def _load(
        self, splits: dict[str, str], client: Any, wait: float | None, **params: Any
    ) -> dict[str, RemoteSplit]:
        """``splits`` maps an attribute prefix ("train") to a server split name."""
        opened = {}
        for prefix, split in splits.items():
            s = opened[prefix] = open_split(self._dataset, split, self._error, client, wait, **params)
            self._set(prefix, s)
        return opened

    def _set(self, prefix: str, split: RemoteSplit) -> None:
        if "X_u8" in split.arrays:
            setattr(self, f"{prefix}_X_u8", split["X_u8"])
        setattr(self, f"{prefix}_X", split["X"])
        for label in self._labels:
            if label in split.arrays:
                setattr(self, f"{prefix}_{label}", split[label])


class TrainValTest(ImageDataset):
    """batchup's datasets with ``train``/``val``/``test`` attributes: ``val`` is the last
    ``n_val`` training samples, ``X`` is float32 in ``[val_lower, val_upper]``."""

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
        self._metadata(splits["train"].metadata)

    def _metadata(self, metadata: dict[str, Any]) -> None:
        """Attributes from the source's metadata (class names), per dataset."""


def folds(metadata: dict[str, Any]) -> list[np.ndarray[Any, Any]]:
    return [np.asarray(f, dtype=np.int32) for f in metadata.get("folds", [])]
