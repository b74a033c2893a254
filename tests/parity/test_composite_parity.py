"""CompositeDataSource against batchup 0.2.3: children streamed by the server, composed here."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from batchup import data_source as bds

from batchup_client import data_source as cds


def make(mod: Any, n: int, seed: int, **kw: Any) -> Any:
    r = np.random.RandomState(seed)
    X = r.standard_normal((n, 3)).astype(np.float32)
    y = (np.arange(n) * 7 + seed).astype(np.int32)
    return mod.ArrayDataSource([X, y], **kw)


def flat(batch: Any) -> list[Any]:
    out = []
    for b in batch:
        out += flat(b) if isinstance(b, tuple) else [b]
    return out


def assert_same(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def both(build: Any, batch_size: int, epochs: int = 1, global_rng: bool = False, limit: int = 200) -> None:
    runs = []
    for mod in (bds, cds):
        ds = build(mod)
        if global_rng:
            np.random.seed(5)
            rng: Any = np.random
            shuffle: Any = True
        else:
            rng = shuffle = np.random.RandomState(5)
        out = []
        for _ in range(epochs):
            for i, batch in enumerate(ds.batch_iterator(batch_size, shuffle=shuffle)):
                out.append((batch, rng.get_state()))
                if i >= limit:
                    break
        runs.append(out)
    want, got = runs
    assert len(got) == len(want)
    for (bg, sg), (bw, sw) in zip(got, want):
        assert_same(bg, bw)
        assert np.array_equal(sg[1], sw[1]) and sg[2:] == sw[2:]


@pytest.mark.parametrize("global_rng", [False, True])
def test_semi_supervised_example_from_batchups_readme(global_rng: bool) -> None:
    # a small labelled set repeating forever beside a large unlabelled set
    def build(mod: Any) -> Any:
        return mod.CompositeDataSource([make(mod, 15, 1, repeats=-1), make(mod, 33, 2)])

    both(build, 10, epochs=2, global_rng=global_rng)


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("trim", [True, False])
def test_flatten_trim_and_nesting(flatten: bool, trim: bool) -> None:
    def build(mod: Any) -> Any:
        a = make(mod, 12, 3, repeats=-1)
        b = make(mod, 29, 4, indices=np.arange(3, 29).astype(np.int32))
        inner = mod.CompositeDataSource([make(mod, 9, 5, repeats=-1), a], flatten=False)
        return mod.CompositeDataSource([a, b, inner], flatten=flatten, trim=trim)

    both(build, 7)


def test_num_samples_indices_and_samples_by_indices() -> None:
    pair = [
        (mod, mod.CompositeDataSource([make(mod, 15, 1, repeats=-1), make(mod, 33, 2)])) for mod in (bds, cds)
    ]
    (_, ref), (_, ours) = pair
    assert ours.num_samples() == ref.num_samples() == 33
    assert ours.is_random_access and ref.is_random_access
    it_ref = ref.batch_indices_iterator(10, shuffle=np.random.RandomState(2))
    it_ours = ours.batch_indices_iterator(10, shuffle=np.random.RandomState(2))
    for w, g in zip(it_ref, it_ours):
        assert_same(tuple(g), tuple(w))
    ix = (np.array([0, 4]), np.array([7, 1]))
    assert_same(ours.samples_by_indices(ix), ref.samples_by_indices(ix))
    assert_same(ours.samples_by_indices_nomapping(ix), ref.samples_by_indices_nomapping(ix))
    for ds in (ref, ours):
        with pytest.raises(
            ValueError, match="length mis-match: indices has 1 items, self has 2 data sources"
        ):
            ds.samples_by_indices([np.array([0])])


def test_a_child_that_is_not_random_access() -> None:
    for mod in (bds, cds):
        it = mod.IteratorDataSource(iter([(np.zeros(3),)]))
        comp = mod.CompositeDataSource([make(mod, 5, 1), it])
        assert not comp.is_random_access
        gen = comp.batch_indices_iterator(2)
        with pytest.raises(TypeError, match="does not support random access"):
            next(gen)
        with pytest.raises(TypeError, match="does not support random access"):
            comp.samples_by_indices([np.array([0]), np.array([0])])


def test_remote_children(client: Any) -> None:
    def build(mod: Any) -> Any:
        if mod is bds:
            return bds.CompositeDataSource([make(bds, 15, 1, repeats=-1), make(bds, 33, 2)])
        parts = [make(bds, 15, 1), make(bds, 33, 2)]
        sup = client.array_source(parts[0].data, repeats=-1)
        unsup = client.array_source(parts[1].data)
        return cds.CompositeDataSource([sup, unsup])

    both(build, 10, epochs=2)


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("shuffle_kind", ["none", "rs", "global"])
@pytest.mark.parametrize("infinite", [False, True])
def test_choice_data_source(stratified: bool, shuffle_kind: str, infinite: bool) -> None:
    def build(mod: Any) -> Any:
        children = [
            make(mod, 40, 1),
            make(mod, 20, 2, repeats=-1 if infinite else 1),
            make(mod, 10, 3, indices=np.arange(2, 10).astype(np.int32)),
            make(mod, 5, 4),
        ]
        return mod.ChoiceDataSource(children, stratified=stratified)

    runs = []
    for mod in (bds, cds):
        ds = build(mod)
        if shuffle_kind == "global":
            np.random.seed(9)
            rng: Any = np.random
            shuffle: Any = True
        elif shuffle_kind == "rs":
            rng = shuffle = np.random.RandomState(9)
        else:
            rng, shuffle = np.random.RandomState(0), None
        out = [(b, rng.get_state()) for _, b in zip(range(60), ds.batch_iterator(5, shuffle=shuffle))]
        runs.append(out)
    want, got = runs
    assert len(got) == len(want)
    for (bg, sg), (bw, sw) in zip(got, want):
        assert_same(bg, bw)
        assert np.array_equal(sg[1], sw[1]) and sg[2:] == sw[2:]


def test_choice_indices_and_samples_by_indices() -> None:
    srcs = {
        mod: mod.ChoiceDataSource([make(mod, 12, 1), make(mod, 7, 2)], stratified=True) for mod in (bds, cds)
    }
    ref, ours = srcs[bds], srcs[cds]
    assert ours.num_samples() == ref.num_samples() == 19
    got = list(ours.batch_indices_iterator(4, shuffle=np.random.RandomState(3)))
    want = list(ref.batch_indices_iterator(4, shuffle=np.random.RandomState(3)))
    assert [g.ds_index for g in got] == [w.ds_index for w in want]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.sample_indices, w.sample_indices)
        choice = cds.ChoiceBatch(sample_indices=w.sample_indices, ds_index=w.ds_index)
        assert_same(ours.samples_by_indices(choice), ref.samples_by_indices(w))
    for ds in (ref, ours):
        with pytest.raises(TypeError, match="indices should be a _ChoiceBatch"):
            ds.samples_by_indices((np.array([0]), 0))
