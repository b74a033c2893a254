"""A converted dataset file's arrays, and the source a client's request makes of them.

``client.source("cifar10", split="train", n_val=10000)`` becomes a
:class:`~batchup_server.sources.SourceSpec` whose fields are views of the file's arrays:
the rows of the split (batchup's rules), and ``X`` mapped from uint8 to float32 in
``[val_lower, val_upper]`` in the workers (``X_u8`` sends the raw bytes, 4x fewer).
Its fields are ``X``, ``X_u8`` and the labels (``y``, ``y_coarse``); clients stream
``metadata["default_fields"]`` (``X``, ``y``) unless they pick others.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from ..sources import FieldSpec, SourceSpec, open_h5
from .catalog import DatasetInfo

__all__ = ["DatasetRequestError", "check_layout", "dataset_source", "split_arrays"]


class DatasetRequestError(ValueError):
    """A request names a split, field or parameter the dataset does not have."""


def split_arrays(info: DatasetInfo, split: str) -> dict[str, str]:
    """Field name -> array name in the group, for one split (before picking rows)."""
    prefix = info.splits[split]
    arrays = {"X_u8" if info.uint8 else "X": f"{prefix}_X_u8" if info.uint8 else f"{prefix}_X"}
    if prefix != "unl":
        arrays.update({label: f"{prefix}_{label}" for label in info.labels})
    return arrays


def check_layout(info: DatasetInfo, path: str) -> str:
    """Why ``path`` is not a usable file of ``info`` ("" when it is)."""
    try:
        with open_h5(path) as f:
            if info.group not in f:
                return f"it has no group /{info.group}"
            group = f[info.group]
            size = os.path.getsize(path)
            for split in info.splits:
                lengths = set()
                for array in split_arrays(info, split).values():
                    if array not in group:
                        return f"it has no array /{info.group}/{array}"
                    d = group[array]
                    lengths.add(d.shape[0] if d.shape else -1)
                    offset = d.id.get_offset() if d.chunks is None else None
                    if offset is not None and offset + d.nbytes > size:
                        return f"/{info.group}/{array} runs past the end of the file (truncated)"
                if len(lengths) != 1:
                    return f"the arrays of split {split!r} differ in length"
            for names in (info.class_names, info.class_names_coarse):
                if isinstance(names, str) and names not in group:
                    return f"it has no array /{info.group}/{names}"
            if info.val == "n_val_folds" and "fold_indices" not in group:
                return f"it has no array /{info.group}/fold_indices"
    except OSError as exc:
        return f"HDF5 cannot read it ({exc})"
    return ""


def _class_names(group: Any, names: tuple[str, ...] | str | None) -> list[str] | None:
    if names is None or isinstance(names, tuple):
        return list(names) if names is not None else None
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in group[names][()]]


def _read_folds(group: Any) -> list[np.ndarray[Any, Any]]:
    from .formats import read_fold_indices

    return [np.asarray(f, dtype=np.int32) for f in read_fold_indices(group)]


_PARAMS = {"split", "n_val", "n_val_folds", "val_lower", "val_upper"}


def _int_or_none(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DatasetRequestError(f"{name} should be a non-negative integer or None, got {value!r}")
    return value


def dataset_source(info: DatasetInfo, path: str, params: dict[str, Any], scratch: str) -> SourceSpec:
    """The source for ``params`` (split, n_val / n_val_folds, val_lower / val_upper),
    with the metadata clients see. Row lists that are not ranges (STL folds) are written as
    ``.npy`` files into ``scratch``."""
    unknown = sorted(set(params) - _PARAMS)
    if unknown:
        raise DatasetRequestError(f"{info.name} takes no parameter(s) {unknown}; it takes {sorted(_PARAMS)}")
    split = params.get("split", next(iter(info.splits)))
    if split not in info.splits:
        raise DatasetRequestError(f"{info.name} has no split {split!r}; it has {list(info.splits)}")
    val_key = info.val or "n_val"
    for key in ("n_val", "n_val_folds"):
        if key in params and key != info.val:
            raise DatasetRequestError(
                f"{info.name} takes no {key}" + (f" (it takes {info.val})" if info.val else "")
            )
    n_val = _int_or_none(val_key, params.get(val_key, info.default_val))
    if not info.uint8 and ("val_lower" in params or "val_upper" in params):
        raise DatasetRequestError(f"{info.name} images are float32 already: it takes no val_lower/val_upper")
    lower, upper = params.get("val_lower", 0.0), params.get("val_upper", 1.0)
    for key, v in (("val_lower", lower), ("val_upper", upper)):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise DatasetRequestError(f"{key} should be a number, got {v!r}")
    arrays = split_arrays(info, split)
    fields = (["X"] if info.uint8 else []) + list(arrays)  # X first: float32 in [val_lower, val_upper]
    default = ["X", *[k for k in arrays if k in info.labels][:1]]

    with open_h5(path) as f:
        group = f[info.group]
        n = int(group[next(iter(arrays.values()))].shape[0])
        rows: tuple[int, int] | None = None
        row_index = ""
        folds = _read_folds(group) if info.val == "n_val_folds" else []
        if info.splits[split] == "train" and split in ("train", "val") and info.val:
            if info.val == "n_val":
                cut = n if not n_val else max(n - n_val, 0)  # batchup: X[:-n_val], X[-n_val:]
                rows = (0, cut) if split == "train" else (cut, n)
            elif not n_val:
                rows = (0, n) if split == "train" else (n, n)
            else:
                val_idx = np.concatenate(folds[-n_val:], axis=0)
                mask = np.zeros(n, dtype=bool)
                mask[val_idx] = True
                index = np.arange(n)[~mask] if split == "train" else val_idx
                row_index = _write_index(scratch, index.astype(np.int64))
        metadata: dict[str, Any] = {
            "dataset": info.name,
            "title": info.title,
            "split": split,
            "default_fields": default,
            val_key: n_val,
        }
        if info.uint8:
            metadata.update(val_lower=lower, val_upper=upper)
        names = _class_names(group, info.class_names)
        if names is not None:
            metadata["class_names"] = names
        coarse = _class_names(group, info.class_names_coarse)
        if coarse is not None:
            metadata["class_names_coarse"] = coarse
        if info.val == "n_val_folds":
            metadata["folds"] = [fold.tolist() for fold in folds]

    specs = []
    for name in fields:
        array = arrays["X_u8" if name == "X" and info.uint8 else name]
        scale = (float(lower), float(upper)) if name == "X" and info.uint8 else None
        specs.append(FieldSpec(name, "h5", path, f"/{info.group}/{array}", rows, row_index, scale))
    return SourceSpec(info.name, tuple(specs), metadata)


def _write_index(folder: str, index: np.ndarray[Any, Any]) -> str:
    """Store ``index`` as ``<folder>/rows-<digest>.npy`` (same rows, same file)."""
    digest = hashlib.sha256(index.tobytes()).hexdigest()[:24]
    path = os.path.join(folder, f"rows-{digest}.npy")
    if not os.path.exists(path):
        tmp = path + ".tmp.npy"
        np.save(tmp, index)
        os.replace(tmp, path)
    return path
