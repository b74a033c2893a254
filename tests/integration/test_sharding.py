"""Rank sharding: every sample of each epoch reaches exactly one rank once, every rank gets
the same number of steps, and the global stream is batchup's with batch_size * world_size."""

from __future__ import annotations

from typing import Any

import batchup.data_source as bds
import batchup.sampling as bsampling
import numpy as np
import pytest

import batchup_client
from batchup_client import data_source, sampling
from batchup_client.distributed import rank_from_env, shard_from_env
from tests.servers import RunningServer, write_train_source

pytestmark = pytest.mark.integration

N = 103
X = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
Y = np.arange(N) % 5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cfg = write_train_source(tmp_path_factory.mktemp("shard"), X, Y)
    srv = RunningServer("--config", cfg)
    try:
        yield srv
    finally:
        srv.stop()


def _rng(seed: int | None) -> Any:
    return None if seed is None else np.random.RandomState(seed)


CASES = [
    # (batch_size, world_size, repeats, shuffle seed, subset)
    (10, 1, 1, 3, False),
    (10, 2, 1, None, False),
    (10, 3, 2, 4, False),
    (7, 4, 1, 5, True),
    (16, 4, 1, 6, False),  # last global batch of 39: 10/10/10/9
    (30, 4, 1, 7, False),  # last global batch of 103 - 120 < 0... one batch of 103 split 26/26/26/25
    (50, 2, -1, 8, False),
]


def _check(ranks: list[list[Any]], rngs: list[Any], want: list[Any], want_rng: Any) -> None:
    steps = {len(r) for r in ranks}
    assert len(steps) == 1, f"ranks got different numbers of steps: {steps}"
    n = steps.pop()
    assert n == len(want)
    for g in range(n):
        for part in range(len(want[g])):
            joined = np.concatenate([ranks[r][g][part] for r in range(len(ranks))])
            np.testing.assert_array_equal(joined, want[g][part])
    if want_rng is not None:  # every rank's RNG ends where batchup's global stream leaves it
        want_state = want_rng.get_state()
        for rng in rngs:
            state = rng.get_state()
            assert np.array_equal(state[1], want_state[1]) and state[2:] == want_state[2:]


@pytest.mark.parametrize("bs, world, repeats, seed, subset", CASES)
@pytest.mark.parametrize("kind", ["drop-in", "remote"])
def test_ranks_cut_batchups_global_stream(
    server: Any, kind: str, bs: int, world: int, repeats: int, seed: Any, subset: bool
) -> None:
    indices = np.random.RandomState(0).permutation(N)[:77] if subset else None
    limit = 9 if repeats == -1 else None
    client = batchup_client.connect(server.endpoint) if kind == "remote" else None
    try:
        ranks, rngs = [], []
        for r in range(world):
            rng = _rng(seed)
            if client is not None:
                ds = client.source("train", indices=indices, repeats=repeats, include_indices=True)
            else:
                ds = data_source.ArrayDataSource(
                    [X, Y], indices=indices, repeats=repeats, include_indices=True
                )
            it = ds.batch_iterator(bs, shuffle=rng, rank=r, world_size=world)
            ranks.append([b for _, b in zip(range(limit or 10**9), it)])
            it.close()
            rngs.append(rng)
        ref_rng = _rng(seed)
        ref = bds.ArrayDataSource([X, Y], indices=indices, repeats=repeats, include_indices=True)
        want = [b for _, b in zip(range(limit or 10**9), ref.batch_iterator(bs * world, shuffle=ref_rng))]
        _check(ranks, rngs, want, ref_rng if limit is None else None)
        if limit is None:  # each sample of each epoch exactly once over all ranks
            seen = np.concatenate([b[0] for r in ranks for b in r])
            expected = np.repeat(np.arange(N) if indices is None else indices, repeats)
            np.testing.assert_array_equal(np.sort(seen), np.sort(expected))
    finally:
        if client is not None:
            client.close()


def test_more_ranks_than_samples_in_the_last_batch_get_empty_batches() -> None:
    ds = data_source.ArrayDataSource([X[:9], Y[:9]])
    per_rank = [list(ds.batch_iterator(2, rank=r, world_size=4)) for r in range(4)]
    assert [len(p) for p in per_rank] == [2, 2, 2, 2]  # same steps everywhere
    assert [len(p[1][0]) for p in per_rank] == [1, 0, 0, 0]  # 9 = 8 + 1
    assert per_rank[3][1][0].shape == (0, 2) and per_rank[3][1][1].shape == (0,)


def test_weighted_sampler_shards_the_global_draws() -> None:
    w = np.linspace(1, 2, N)
    ranks = []
    for r in range(3):
        ds = data_source.ArrayDataSource([X, Y], sampler=sampling.WeightedSampler(w))
        it = ds.batch_iterator(5, shuffle=np.random.RandomState(9), rank=r, world_size=3)
        ranks.append([next(it) for _ in range(4)])
    ref = bds.ArrayDataSource([X, Y], sampler=bsampling.WeightedSampler(w)).batch_iterator(
        15, shuffle=np.random.RandomState(9)
    )
    for g in range(4):
        want = next(ref)
        np.testing.assert_array_equal(np.concatenate([ranks[r][g][1] for r in range(3)]), want[1])


def test_composite_shards_each_child_alike() -> None:
    lab = data_source.ArrayDataSource([X[:20], Y[:20]], repeats=-1)
    unl = data_source.ArrayDataSource([X])
    ranks = []
    for r in range(2):
        comp = data_source.CompositeDataSource([lab, unl])
        ranks.append(list(comp.batch_iterator(8, shuffle=np.random.RandomState(2), rank=r, world_size=2)))
    blab = bds.ArrayDataSource([X[:20], Y[:20]], repeats=-1)
    want = list(
        bds.CompositeDataSource([blab, bds.ArrayDataSource([X])]).batch_iterator(
            16, shuffle=np.random.RandomState(2)
        )
    )
    assert len(ranks[0]) == len(ranks[1]) == len(want)
    for g, w in enumerate(want):
        for part in range(3):
            np.testing.assert_array_equal(np.concatenate([ranks[0][g][part], ranks[1][g][part]]), w[part])


def test_batch_map_concat_returns_positions_that_place_every_result_once() -> None:
    ds = data_source.ArrayDataSource([X, Y])
    full = bds.ArrayDataSource([X, Y]).batch_map_concat(lambda a, b: (a.sum(axis=1), b * 2), batch_size=8)
    placed = [np.full(N, np.nan), np.full(N, -1)]
    count = np.zeros(N, int)
    for r in range(3):
        results, positions = ds.batch_map_concat(
            lambda a, b: (a.sum(axis=1), b * 2), batch_size=8, rank=r, world_size=3
        )
        assert len(positions) == len(results[0])
        placed[0][positions], placed[1][positions] = results
        np.add.at(count, positions, 1)
    assert (count == 1).all()
    np.testing.assert_array_equal(placed[0], full[0])
    np.testing.assert_array_equal(placed[1], full[1])


def test_batch_map_mean_combines_to_the_global_mean() -> None:
    ds = data_source.ArrayDataSource([X, Y])
    (want,) = bds.ArrayDataSource([X, Y]).batch_map_mean(lambda a, b: float(a.sum()), batch_size=8)
    parts = [
        ds.batch_map_mean(lambda a, b: float(a.sum()), batch_size=8, rank=r, world_size=2) for r in range(2)
    ]
    total = sum(m[0] * n for m, n in parts) / sum(n for _, n in parts)
    assert sum(n for _, n in parts) == N
    assert total == pytest.approx(want)


@pytest.mark.parametrize("bs, world, repeats, seed, subset", CASES)
def test_index_batches_shard_by_the_same_rule(
    bs: int, world: int, repeats: int, seed: Any, subset: bool
) -> None:
    """batch_indices_iterator(rank=r, world_size=w): rank r's part of batchup's global index
    batches (batch_size * w), the same cut as its batch_iterator, the RNG left where
    batchup's global stream leaves it."""
    indices = np.random.RandomState(0).permutation(N)[:77] if subset else None
    limit = 9 if repeats == -1 else 10**9
    ranks, rngs = [], []
    for r in range(world):
        rng = _rng(seed)
        ds = data_source.ArrayDataSource([X, Y], indices=indices, repeats=repeats)
        ranks.append(
            [(b,) for _, b in zip(range(limit), ds.batch_indices_iterator(bs, rng, rank=r, world_size=world))]
        )
        rngs.append(rng)
    ref_rng = _rng(seed)
    ref = bds.ArrayDataSource([X, Y], indices=indices, repeats=repeats)
    want = [(b,) for _, b in zip(range(limit), ref.batch_indices_iterator(bs * world, shuffle=ref_rng))]
    _check(ranks, rngs, want, ref_rng if repeats != -1 else None)
    if world > 1 and repeats == 1:  # what rank 1's batch_iterator gathers are these rows
        ds = data_source.ArrayDataSource([X, Y], indices=indices, include_indices=True)
        got = list(ds.batch_iterator(bs, shuffle=_rng(seed), rank=1, world_size=world))
        assert [g[0].tolist() for g in got] == [b[0].tolist() for b in ranks[1]]


def _rank_parts(ds: Any, bs: int, seed: int, world: int = 2) -> list[list[Any]]:
    """Each rank's index batches of ``ds`` (batch size ``bs`` per rank)."""
    return [
        list(ds.batch_indices_iterator(bs, shuffle=np.random.RandomState(seed), rank=r, world_size=world))
        for r in range(world)
    ]


def _assert_joined(parts: list[Any], whole: Any) -> None:
    """The ranks' parts of one global index batch join into it: arrays concatenate, a
    composite's children alike, a choice's child number is every rank's."""
    if hasattr(whole, "ds_index"):  # a choice batch (batchup's or ours)
        assert all(p.ds_index == whole.ds_index for p in parts)
        _assert_joined([p.sample_indices for p in parts], whole.sample_indices)
    elif isinstance(whole, tuple):
        for child, w in enumerate(whole):
            _assert_joined([p[child] for p in parts], w)
    else:
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_composite_and_choice_index_batches_shard_like_their_batches() -> None:
    lab = data_source.ArrayDataSource([X[:20], Y[:20]], repeats=-1)
    unl = data_source.ArrayDataSource([X])
    comp = data_source.CompositeDataSource([lab, unl])
    choice = data_source.ChoiceDataSource([data_source.ArrayDataSource([X[:40]]), unl])
    nested = data_source.ChoiceDataSource([choice, data_source.ArrayDataSource([Y])])  # a choice of choices
    cases = [
        (
            comp,
            8,
            2,
            bds.CompositeDataSource(
                [bds.ArrayDataSource([X[:20], Y[:20]], repeats=-1), bds.ArrayDataSource([X])]
            ),
        ),
        (choice, 5, 3, bds.ChoiceDataSource([bds.ArrayDataSource([X[:40]]), bds.ArrayDataSource([X])])),
        (
            nested,
            5,
            4,
            bds.ChoiceDataSource(
                [
                    bds.ChoiceDataSource([bds.ArrayDataSource([X[:40]]), bds.ArrayDataSource([X])]),
                    bds.ArrayDataSource([Y]),
                ]
            ),
        ),
    ]
    for ds, bs, seed, ref in cases:
        whole = list(ref.batch_indices_iterator(bs * 2, shuffle=np.random.RandomState(seed)))
        parts = _rank_parts(ds, bs, seed)
        assert len(parts[0]) == len(parts[1]) == len(whole)
        for g, w in enumerate(whole):
            _assert_joined([p[g] for p in parts], w)
    assert any(w.ds_index == 0 for w in nested.batch_indices_iterator(10, shuffle=np.random.RandomState(4)))
    with pytest.raises(ValueError):
        next(comp.batch_indices_iterator(8, rank=2, world_size=2))


@pytest.mark.parametrize(
    "rank, world, error",
    [(0, None, TypeError), (None, 2, TypeError), (2, 2, ValueError), (-1, 2, ValueError), (0, 0, ValueError)],
)
def test_bad_rank_arguments(rank: Any, world: Any, error: type) -> None:
    ds = data_source.ArrayDataSource([X, Y])
    with pytest.raises(error):
        next(ds.batch_iterator(8, rank=rank, world_size=world))
    with pytest.raises(error):
        next(ds.batch_indices_iterator(8, rank=rank, world_size=world))


def test_rank_from_torchrun_environment() -> None:
    assert rank_from_env({}) is None and shard_from_env({}) == {}
    info = rank_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "2"}) == {"rank": 0, "world_size": 2}
    for bad in ({"RANK": "1"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(ValueError):
            rank_from_env(bad)
