"""The source catalog: a request's source reference becomes what workers open, or a typed
error that names what was wrong. Pure logic over real files in a temporary folder."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import pytest

from batchup_protocol import ErrorCode
from batchup_protocol.host import content_key
from batchup_server.catalog import SourceCatalog, in_range
from batchup_server.datasets.service import DatasetService
from batchup_server.datasets.store import DatasetSettings, DatasetStore
from batchup_server.errors import RequestError
from batchup_server.sources import FieldSpec, SourceSpec
from batchup_server.uploads import Uploads


@pytest.fixture
def catalog(tmp_path: pathlib.Path) -> SourceCatalog:
    X = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    y = np.arange(10, dtype=np.int64)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "up.npy", np.zeros((4, 2), np.uint8))
    spec = SourceSpec(
        "train",
        (FieldSpec("X", "npy", str(tmp_path / "X.npy")), FieldSpec("y", "npy", str(tmp_path / "y.npy"))),
    )
    uploads = Uploads(str(tmp_path), 1 << 20)
    uploads.paths["k1"] = str(tmp_path / "up.npy")
    store = DatasetStore(DatasetSettings(home=str(tmp_path / "home")))  # nothing cached, no downloads
    return SourceCatalog({"train": spec}, uploads, DatasetService(store, str(tmp_path), download=False))


def _code(call: Any) -> tuple[ErrorCode, str]:
    with pytest.raises(RequestError) as info:
        call()
    return info.value.code, str(info.value)


def test_configured_sources_are_described_once_at_start(catalog: SourceCatalog) -> None:
    entry = catalog.sources["train"]
    assert entry.length == 10
    assert [f["name"] for f in entry.fields] == ["X", "y"]
    assert entry.row_bytes == [12, 8]
    assert catalog.resolve({"name": "train"}) is entry


def test_uploaded_arrays_resolve_by_key(catalog: SourceCatalog) -> None:
    entry = catalog.resolve({"arrays": ["k1"]})
    assert entry.length == 4 and entry.row_bytes == [2]
    code, text = _code(lambda: catalog.resolve({"arrays": ["k1", "nope"]}))
    assert code == ErrorCode.UNKNOWN_SOURCE and "['nope']" in text
    code, _ = _code(lambda: catalog.resolve({"arrays": []}))
    assert code == ErrorCode.MALFORMED


@pytest.mark.parametrize(
    ("source", "want", "says"),
    [
        ({"name": 3}, ErrorCode.MALFORMED, "source.name should be a string"),
        ({"name": "train", "params": [1]}, ErrorCode.MALFORMED, "source.params should be a map"),
        ({"name": "train", "params": {"a": 1}}, ErrorCode.INVALID_ARGUMENT, "takes no parameters"),
        ({"name": "nosuch"}, ErrorCode.UNKNOWN_SOURCE, "this server has ['train']"),
        ({"name": "mnist"}, ErrorCode.UNAVAILABLE, "not cached"),
    ],
)
def test_bad_references_are_typed_errors(
    catalog: SourceCatalog, source: Any, want: ErrorCode, says: str
) -> None:
    code, text = _code(lambda: catalog.resolve(source))
    assert code == want and says in text


def test_fields_are_selected_by_name(catalog: SourceCatalog) -> None:
    entry = catalog.sources["train"]
    assert catalog.select(entry, None) == [0, 1]
    assert catalog.select(entry, ["y", "X"]) == [1, 0]
    code, text = _code(lambda: catalog.select(entry, ["X", "z"]))
    assert code == ErrorCode.INVALID_ARGUMENT and "no field(s) ['z']; it has ['X', 'y']" in text


def test_composite_parts(catalog: SourceCatalog) -> None:
    parts = catalog.composite_parts(
        {
            "composite": [
                {"source": {"name": "train"}, "fields": ["y"], "include_indices": True},
                {"source": {"arrays": ["k1"]}},
            ]
        }
    )
    assert [(e.length, f, inc) for e, f, inc in parts] == [(10, [1], True), (4, [0], False)]
    for bad, says in [
        ({"composite": []}, "non-empty list"),
        ({"composite": [{"source": {"composite": []}}]}, "plain source reference"),
        ({"composite": [{"source": {"name": "train"}, "fields": "X"}]}, "list of names"),
    ]:
        code, text = _code(lambda bad=bad: catalog.composite_parts(bad))
        assert code == ErrorCode.MALFORMED and says in text


def test_plans_must_fit_their_source() -> None:
    ok = np.array([0, 9, -10])
    SourceCatalog.check_plan_fits({"kind": "subset", "indices": 0}, [ok], 10)
    SourceCatalog.check_plan_fits({"kind": "standard", "length": 10}, [], 10)
    code, text = _code(
        lambda: SourceCatalog.check_plan_fits({"kind": "subset", "indices": 0}, [np.array([10])], 10)
    )
    assert code == ErrorCode.INVALID_ARGUMENT and "out of range" in text
    code, text = _code(lambda: SourceCatalog.check_plan_fits({"kind": "standard", "length": 11}, [], 10))
    assert code == ErrorCode.INVALID_ARGUMENT and "plan length 11" in text


def test_in_range_counts_negatives_from_the_end() -> None:
    assert in_range(np.array([], np.int64), 0)
    assert in_range(np.array([-3, 0, 2]), 3)
    assert not in_range(np.array([3]), 3)
    assert not in_range(np.array([-4]), 3)


def _held(uploads: Uploads, folder: pathlib.Path, value: int, rows: int = 1000) -> tuple[str, str]:
    arr = np.full(rows, value, dtype=np.int64)  # 8 kB and a 128-byte header
    key = content_key(arr)
    path = str(folder / (key.replace(":", "-") + ".npy"))
    np.save(path, arr)
    uploads.adopt(key, path)
    return key, path


def test_unused_arrays_go_least_recently_used_first_down_to_the_budget(tmp_path: pathlib.Path) -> None:
    uploads = Uploads(str(tmp_path), 1 << 30)
    (a, pa), (b, pb), (c, pc) = (_held(uploads, tmp_path, v) for v in range(3))
    assert uploads.held_bytes == 3 * 8128
    uploads.touch([a])  # a is now the most recently used: b goes first, then c
    assert uploads.evict(set(), 2 * 8128, grace=0.0) == [pb]
    assert not os.path.exists(pb) and b not in uploads.paths
    assert uploads.evict(set(), 2 * 8128, grace=0.0) == []  # within the budget
    assert uploads.evict({pc}, 0, grace=0.0) == [pa]  # c is in use: never deleted
    assert list(uploads.paths) == [c] and uploads.held_bytes == 8128
    assert uploads.evict(set(), 0, grace=60.0) == []  # c was asked for within the grace
    assert uploads.evict(set(), 0, grace=0.0) == [pc] and uploads.held_bytes == 0
    _held(uploads, tmp_path, 1)  # deleted, then sent again: held as before
    assert uploads.held_bytes == 8128
