"""Parity of the index plans and drop-in samplers with batchup 0.2.3's samplers (no server).

``batchup_protocol.plan`` (source: ``protocol/plan.py``) must draw from the RNG exactly as
batchup's sampler generators do: same batches (values and dtypes), same number of
batches, and the same ``RandomState`` state after every batch and at exhaustion.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import numpy as np
import pytest
from batchup import sampling as bsampling
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from batchup_client import sampling as csampling
from batchup_protocol.plan import SequencePlan, WeightedPlan

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
INFINITE_CAP = 30
REPEATS = [1, 2, 3, 5, -1]


# ----------------------------------------------------------------------------- helpers


def assert_same_array(got: Any, exp: Any, what: str = "") -> None:
    assert isinstance(got, np.ndarray), f"{what}: got {type(got)}, expected ndarray"
    assert got.dtype == exp.dtype, f"{what}: dtype {got.dtype} != batchup's {exp.dtype}"
    assert got.shape == exp.shape, f"{what}: shape {got.shape} != batchup's {exp.shape}"
    np.testing.assert_array_equal(got, exp, err_msg=what)


def assert_same_rng(got: np.random.RandomState, exp: np.random.RandomState, what: str = "") -> None:
    g, e = got.get_state(), exp.get_state()
    assert g[0] == e[0], what
    assert np.array_equal(g[1], e[1]), f"{what}: RNG key differs from batchup's"
    assert g[2:] == e[2:], f"{what}: RNG (pos, has_gauss, gauss) {g[2:]} != batchup's {e[2:]}"


def plan_batches(plan: SequencePlan | WeightedPlan) -> Any:
    while True:
        b = plan.next()
        if b is None:
            return
        yield b


def compare_streams(
    got_iter: Any,
    exp_iter: Any,
    rng_got: np.random.RandomState | None,
    rng_exp: np.random.RandomState | None,
    cap: int | None,
    what: str,
) -> int:
    """Step both iterators in lock-step; compare every batch and the RNG after it."""
    n = 0
    while cap is None or n < cap:
        exp = next(exp_iter, None)
        got = next(got_iter, None)
        if exp is None:
            assert got is None, f"{what}: extra batch #{n} {got!r} (batchup stopped)"
            break
        assert got is not None, f"{what}: stopped after {n} batches, batchup yields more"
        assert_same_array(got, exp, f"{what} batch #{n}")
        if rng_exp is not None:
            assert rng_got is not None
            assert_same_rng(rng_got, rng_exp, f"{what} after batch #{n}")
        n += 1
    if rng_exp is not None:
        assert rng_got is not None
        assert_same_rng(rng_got, rng_exp, f"{what} at the end")
    return n


def make_indices(length: int, dtype: Any, seed: int) -> np.ndarray:
    r = np.random.RandomState(seed % (2**32))
    return r.choice(length + 25, size=length, replace=False).astype(dtype)


# ----------------------------------------------------------------------------- SequencePlan


@SETTINGS
@given(
    length=st.integers(0, 40),
    batch_size=st.integers(1, 50),
    repeats=st.sampled_from(REPEATS),
    subset=st.booleans(),
    idx_dtype=st.sampled_from([np.int32, np.int64]),
    shuffled=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_sequence_plan_matches_batchup_samplers(
    length: int,
    batch_size: int,
    repeats: int,
    subset: bool,
    idx_dtype: Any,
    shuffled: bool,
    seed: int,
) -> None:
    assume(not (length == 0 and repeats == -1))  # batchup loops forever there
    indices = make_indices(length, idx_dtype, seed) if subset else None
    if indices is None:
        oracle: Any = bsampling.StandardSampler(length, repeats=repeats)
    else:
        oracle = bsampling.SubsetSampler(indices, repeats=repeats)
    rng_exp = np.random.RandomState(seed) if shuffled else None
    rng_got = np.random.RandomState(seed) if shuffled else None
    if shuffled:
        exp_iter = oracle.shuffled_indices_batch_iterator(batch_size, rng_exp)
    else:
        exp_iter = oracle.in_order_indices_batch_iterator(batch_size)
    plan = SequencePlan(length, batch_size, repeats, indices, rng_got)
    what = (
        f"SequencePlan(length={length}, bs={batch_size}, repeats={repeats}, "
        f"subset={subset and np.dtype(idx_dtype).name}, shuffled={shuffled}, seed={seed})"
    )
    cap = INFINITE_CAP if repeats == -1 else None
    n = compare_streams(plan_batches(plan), exp_iter, rng_got, rng_exp, cap, what)
    if repeats != -1:
        # exhausted for good: no further batches and no further draws
        assert plan.next() is None
        assert plan.next() is None
        if shuffled:
            assert rng_got is not None and rng_exp is not None
            assert_same_rng(rng_got, rng_exp, what + " after exhaustion")
        assert plan.num_samples() == length * repeats
    else:
        assert n == INFINITE_CAP
        assert plan.num_samples() == np.inf


@SETTINGS
@given(
    length=st.integers(0, 40),
    batch_size=st.integers(1, 50),
    repeats=st.sampled_from(REPEATS),
    subset=st.booleans(),
    idx_dtype=st.sampled_from([np.int32, np.int64]),
    shuffled=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_dropin_sampler_iterators_match_batchup(
    length: int,
    batch_size: int,
    repeats: int,
    subset: bool,
    idx_dtype: Any,
    shuffled: bool,
    seed: int,
) -> None:
    assume(not (length == 0 and repeats == -1))
    indices = make_indices(length, idx_dtype, seed) if subset else None
    if indices is None:
        oracle: Any = bsampling.StandardSampler(length, repeats=repeats)
        mine: Any = csampling.StandardSampler(length, repeats=repeats)
    else:
        oracle = bsampling.SubsetSampler(indices, repeats=repeats)
        mine = csampling.SubsetSampler(indices, repeats=repeats)
    rng_exp = np.random.RandomState(seed) if shuffled else None
    rng_got = np.random.RandomState(seed) if shuffled else None
    if shuffled:
        exp_iter = oracle.shuffled_indices_batch_iterator(batch_size, rng_exp)
        got_iter = mine.shuffled_indices_batch_iterator(batch_size, rng_got)
        assert rng_got is not None and rng_exp is not None
        # creating the iterators draws nothing
        assert_same_rng(rng_got, rng_exp, "after creating the iterators")
        assert_same_rng(rng_got, np.random.RandomState(seed), "after creating the iterators")
    else:
        exp_iter = oracle.in_order_indices_batch_iterator(batch_size)
        got_iter = mine.in_order_indices_batch_iterator(batch_size)
    assert inspect.isgenerator(got_iter) == inspect.isgenerator(exp_iter)
    what = (
        f"{type(mine).__name__}(length={length}, repeats={repeats}, "
        f"subset={subset and np.dtype(idx_dtype).name}) bs={batch_size} shuffled={shuffled} seed={seed}"
    )
    cap = INFINITE_CAP if repeats == -1 else None
    compare_streams(got_iter, exp_iter, rng_got, rng_exp, cap, what)
    assert mine.num_indices_generated() == oracle.num_indices_generated()


def test_sequence_plan_rejects_empty_infinite() -> None:
    # batchup hangs forever (yields nothing) for length 0 with repeats=-1; the plan refuses.
    with pytest.raises(ValueError):
        SequencePlan(0, 5, -1)
    with pytest.raises(ValueError):
        SequencePlan(0, 5, -1, np.arange(0))


# ----------------------------------------------------------------------------- WeightedPlan


@SETTINGS
@given(
    length=st.integers(1, 40),
    batch_size=st.integers(1, 50),
    subset=st.booleans(),
    idx_dtype=st.sampled_from([np.int32, np.int64]),
    w_dtype=st.sampled_from([np.float64, np.float32, np.int64]),
    zeros=st.booleans(),
    n_batches=st.integers(1, INFINITE_CAP),
    seed=st.integers(0, 2**32 - 1),
)
def test_weighted_plan_matches_batchup_samplers(
    length: int,
    batch_size: int,
    subset: bool,
    idx_dtype: Any,
    w_dtype: Any,
    zeros: bool,
    n_batches: int,
    seed: int,
) -> None:
    r = np.random.RandomState(seed)
    if np.dtype(w_dtype).kind == "f":
        weights = r.uniform(0.0, 3.0, size=length).astype(w_dtype)
    else:
        weights = r.randint(0, 5, size=length).astype(w_dtype)
    if zeros:
        weights[r.rand(length) < 0.5] = 0
    assume(weights.sum() != 0)
    if np.dtype(w_dtype).kind != "f" and subset:
        weights = weights.astype(np.float64)  # WeightedSubsetSampler does not astype(float)
    what = (
        f"weighted length={length} bs={batch_size} subset={subset} {np.dtype(w_dtype).name} "
        f"zeros={zeros} seed={seed}"
    )
    rng_exp, rng_got = np.random.RandomState(seed + 1), np.random.RandomState(seed + 1)
    if subset:
        indices = make_indices(length, idx_dtype, seed)
        oracle: Any = bsampling.WeightedSubsetSampler(weights, indices)
        mine: Any = csampling.WeightedSubsetSampler(weights, indices)
        assert_same_array(mine.sub_weights, oracle.sub_weights, what + " sub_weights")
        plan = WeightedPlan(mine.sub_weights, batch_size, rng_got, indices, "WeightedSubsetSampler")
    else:
        oracle = bsampling.WeightedSampler(weights)
        mine = csampling.WeightedSampler(weights)
        assert_same_array(mine.weights, oracle.weights, what + " weights")
        plan = WeightedPlan(mine.weights, batch_size, rng_got)
    exp_iter = oracle.shuffled_indices_batch_iterator(batch_size, rng_exp)
    n = compare_streams(plan_batches(plan), exp_iter, rng_got, rng_exp, n_batches, what)
    assert n == n_batches
    assert plan.num_samples() == np.inf

    # the drop-in sampler's own iterator is the same stream
    rng_exp, rng_got = np.random.RandomState(seed + 2), np.random.RandomState(seed + 2)
    exp_iter = oracle.shuffled_indices_batch_iterator(batch_size, rng_exp)
    got_iter = mine.shuffled_indices_batch_iterator(batch_size, rng_got)
    assert inspect.isgenerator(got_iter)
    n = compare_streams(got_iter, exp_iter, rng_got, rng_exp, n_batches, what + " (sampler)")
    assert n == n_batches


@pytest.mark.parametrize("subset", [False, True])
def test_weighted_plan_in_order_not_supported(subset: bool) -> None:
    w = np.array([0.25, 0.75])
    if subset:
        plan = WeightedPlan(w, 3, None, np.array([4, 7]), "WeightedSubsetSampler")
        msg = "In-order sampling not supported by WeightedSubsetSampler"
    else:
        plan = WeightedPlan(w, 3, None)
        msg = "In-order sampling not supported by WeightedSampler"
    with pytest.raises(NotImplementedError) as exc:
        plan.next()
    assert str(exc.value) == msg


# ----------------------------------------------------------------------------- sampler classes


def raises_same(fn_got: Any, fn_exp: Any) -> BaseException:
    """Both calls raise the same exception type with the same message; returns batchup's."""
    with pytest.raises(Exception) as exp:
        fn_exp()
    with pytest.raises(Exception) as got:
        fn_got()
    assert type(got.value) is type(exp.value), f"{type(got.value)} != batchup's {type(exp.value)}"
    g = str(got.value).replace("batchup_client.", "batchup.")
    assert g == str(exp.value)
    return exp.value


def test_num_batches() -> None:
    for n in range(40):
        for bs in range(1, 45):
            assert csampling.num_batches(n, bs) == bsampling.num_batches(n, bs)
            assert type(csampling.num_batches(n, bs)) is type(bsampling.num_batches(n, bs))


@pytest.mark.parametrize("repeats", [0, -2, -5, -100])
def test_bad_repeats(repeats: int) -> None:
    idx = np.array([1, 3, 5])
    e = raises_same(
        lambda: csampling.StandardSampler(10, repeats),
        lambda: bsampling.StandardSampler(10, repeats),
    )
    assert isinstance(e, ValueError)
    assert str(e) == f"Invalid number of repeats; should be >= 1 or -1, not {repeats}"
    raises_same(
        lambda: csampling.SubsetSampler(idx, repeats=repeats),
        lambda: bsampling.SubsetSampler(idx, repeats=repeats),
    )


@pytest.mark.parametrize("repeats", [1, 2, 7, -1])
def test_standard_and_subset_attributes(repeats: int) -> None:
    e, g = bsampling.StandardSampler(13, repeats), csampling.StandardSampler(13, repeats)
    assert (g.length, g.repeats) == (e.length, e.repeats)
    assert g.num_indices_generated() == e.num_indices_generated()
    assert type(g.num_indices_generated()) is type(e.num_indices_generated())
    ix = np.array([3, 1, 2])
    assert g.map_indices(ix) is ix and e.map_indices(ix) is ix
    for dtype in (np.int32, np.int64):
        idx = np.array([9, 4, 11, 0, 7], dtype=dtype)
        e, g = bsampling.SubsetSampler(idx, repeats), csampling.SubsetSampler(idx, repeats)
        assert g.indices is idx and e.indices is idx
        assert (g.length, g.repeats) == (e.length, e.repeats)
        assert g.num_indices_generated() == e.num_indices_generated()
        assert type(g.num_indices_generated()) is type(e.num_indices_generated())
        for pos in (np.array([4, 0, 2]), np.array([1], dtype=np.int32), np.arange(0), slice(1, 4)):
            assert_same_array(g.map_indices(pos), e.map_indices(pos), f"map_indices({pos})")


def test_abstract_sampler() -> None:
    e, g = bsampling.AbstractSampler(), csampling.AbstractSampler()
    raises_same(g.num_indices_generated, e.num_indices_generated)
    ix = np.array([1, 2])
    assert g.map_indices(ix) is ix and e.map_indices(ix) is ix
    # raised immediately: these methods are not generators
    err = raises_same(
        lambda: g.in_order_indices_batch_iterator(3), lambda: e.in_order_indices_batch_iterator(3)
    )
    assert isinstance(err, NotImplementedError)
    raises_same(
        lambda: g.shuffled_indices_batch_iterator(3, np.random.RandomState(0)),
        lambda: e.shuffled_indices_batch_iterator(3, np.random.RandomState(0)),
    )


@pytest.mark.parametrize(
    "weights",
    [
        np.array([1.0, 2.0, 3.0, 0.0]),
        np.array([1, 0, 5], dtype=np.int32),
        np.array([0.5, 0.25], dtype=np.float32),
        np.array([7.0]),
    ],
)
def test_weighted_sampler_attributes(weights: np.ndarray) -> None:
    e, g = bsampling.WeightedSampler(weights), csampling.WeightedSampler(weights)
    assert_same_array(g.weights, e.weights, "weights")
    assert g.length == e.length
    assert g.num_indices_generated() == e.num_indices_generated() == np.inf
    ix = np.array([0, 0])
    assert g.map_indices(ix) is ix and e.map_indices(ix) is ix
    err = raises_same(
        lambda: g.in_order_indices_batch_iterator(4), lambda: e.in_order_indices_batch_iterator(4)
    )  # immediate, not lazy
    assert isinstance(err, NotImplementedError)
    assert str(err) == "In-order sampling not supported by WeightedSampler"


@pytest.mark.parametrize("weights", [np.zeros(4), np.zeros(3, dtype=np.int64), np.array([1.0, -1.0])])
def test_weighted_sampler_zero_sum(weights: np.ndarray) -> None:
    err = raises_same(lambda: csampling.WeightedSampler(weights), lambda: bsampling.WeightedSampler(weights))
    assert isinstance(err, ValueError) and str(err) == "weights should not sum to 0"


def test_weighted_sampler_list_weights() -> None:
    raises_same(lambda: csampling.WeightedSampler([1.0, 2.0]), lambda: bsampling.WeightedSampler([1.0, 2.0]))


def test_weighted_subset_sampler() -> None:
    idx = np.array([5, 2, 9], dtype=np.int32)
    for w in (
        np.array([1.0, 3.0, 0.0]),
        np.array([1, 1, 2]),
        np.array([0.2, 0.3, 0.5], dtype=np.float32),
    ):
        e, g = bsampling.WeightedSubsetSampler(w, idx), csampling.WeightedSubsetSampler(w, idx)
        assert_same_array(g.sub_weights, e.sub_weights, "sub_weights")
        assert g.indices is idx and e.indices is idx
        assert g.length == e.length
        assert g.num_indices_generated() == e.num_indices_generated() == np.inf
        pos = np.array([2, 0, 0, 1])
        assert_same_array(g.map_indices(pos), e.map_indices(pos), "map_indices")
        err = raises_same(
            functools.partial(g.in_order_indices_batch_iterator, 2),
            functools.partial(e.in_order_indices_batch_iterator, 2),
        )
        assert isinstance(err, NotImplementedError)
        assert str(err) == "In-order sampling not supported by WeightedSubsetSampler"
    # length mismatch
    err = raises_same(
        lambda: csampling.WeightedSubsetSampler(np.ones(4), idx),
        lambda: bsampling.WeightedSubsetSampler(np.ones(4), idx),
    )
    assert isinstance(err, ValueError)
    assert str(err) == "sub_weights and indices should have the same length; 4 != 3"
    # zero sum
    err = raises_same(
        lambda: csampling.WeightedSubsetSampler(np.zeros(3), idx),
        lambda: bsampling.WeightedSubsetSampler(np.zeros(3), idx),
    )
    assert isinstance(err, ValueError) and str(err) == "sub_weights should not sum to 0"


def _quiet(fn: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # batchup: 1/0 for absent classes
        return fn()


@pytest.mark.parametrize(
    "y",
    [
        np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2]),
        np.array([0, 0, 2, 2, 2, 5]),  # absent classes 1, 3, 4
        np.array([3, 3, 3]),
        np.array([1, 0, 1, 0, 0, 4, 4], dtype=np.int32),
        np.array([0]),
    ],
)
def test_class_balancing(y: np.ndarray) -> None:
    e = _quiet(lambda: bsampling.WeightedSampler.class_balancing_sample_weights(y))
    g = _quiet(lambda: csampling.WeightedSampler.class_balancing_sample_weights(y))
    assert_same_array(g, e, "class_balancing_sample_weights")
    assert np.isclose(g.sum(), 1.0)
    es = _quiet(lambda: bsampling.WeightedSampler.class_balancing_sampler(y))
    gs = _quiet(lambda: csampling.WeightedSampler.class_balancing_sampler(y))
    assert isinstance(gs, csampling.WeightedSampler)
    assert_same_array(gs.weights, es.weights, "class_balancing_sampler weights")
    idx = np.arange(len(y))[::2]
    es = _quiet(lambda: bsampling.WeightedSubsetSampler.class_balancing_sampler(y, idx))
    gs = _quiet(lambda: csampling.WeightedSubsetSampler.class_balancing_sampler(y, idx))
    assert isinstance(gs, csampling.WeightedSubsetSampler)
    assert_same_array(gs.sub_weights, es.sub_weights, "subset class_balancing_sampler sub_weights")
    assert gs.indices is idx


def test_class_balancing_reference_example() -> None:
    y = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    g = csampling.WeightedSampler.class_balancing_sample_weights(y)
    np.testing.assert_allclose(g, [1 / 6] * 2 + [1 / 9] * 3 + [1 / 15] * 5)
