"""Server stream state: credit window, production, checkpoints and reseeding (no sockets)."""

from __future__ import annotations

import numpy as np
import pytest

from batchup_protocol import decode_rng_state, states_equal
from batchup_protocol.plan import CountingRNG, SequencePlan
from batchup_server.streams import CreditWindow, End, Stream, StreamError, Task


def make_stream(n=10, bs=3, repeats=1, credits=4, max_bytes=1 << 20, seed=0, row_bytes=8):
    rng = CountingRNG(np.random.RandomState(seed)) if seed is not None else None
    return Stream(SequencePlan(n, bs, repeats, rng=rng), rng, CreditWindow(credits, max_bytes), row_bytes)


def produce_all(stream):
    out = []
    while stream.can_produce():
        out.append(stream.produce())
        if isinstance(out[-1], End):
            break
    return out


def test_window_stops_production_at_the_granted_credit():
    s = make_stream(n=100, credits=4)
    items = produce_all(s)
    assert [t.seq for t in items] == [0, 1, 2, 3]
    assert s.window.statistics().in_flight == 4 and not s.can_produce()
    s.credit(2, 2)
    assert [t.seq for t in produce_all(s)] == [4, 5]
    assert s.window.statistics().in_flight == 4


def test_byte_budget_and_the_one_batch_rule():
    s = make_stream(n=100, bs=10, credits=50, max_bytes=250, row_bytes=10)  # 100 B per batch
    assert len(produce_all(s)) == 2
    big = make_stream(n=100, bs=10, credits=50, max_bytes=5, row_bytes=10)
    assert len(produce_all(big)) == 1  # larger than the budget: one at a time
    big.credit(1, 1)
    assert len(produce_all(big)) == 1


def test_end_carries_the_rng_state_of_batchups_last_draw():
    # n=9, bs=3, repeats=2: the last batch ends exactly at the pass boundary, so batchup
    # draws the discarded permutation in the call that raises StopIteration
    s = make_stream(n=9, bs=3, repeats=2, credits=100)
    items = produce_all(s)
    assert isinstance(items[-1], End) and items[-1].seq == 6
    assert items[-1].rng is not None
    ref = np.random.RandomState(0)
    for _ in range(3):
        ref.permutation(9)
    assert states_equal(decode_rng_state(items[-1].rng), ref.get_state())


def test_only_batches_that_draw_carry_rng():
    s = make_stream(n=10, bs=3, credits=100)
    items = produce_all(s)
    assert items[0].rng is not None and all(t.rng is None for t in items[1:])
    assert isinstance(items[-1], End)
    in_order = make_stream(n=10, bs=3, credits=100, seed=None)
    assert all(t.rng is None for t in produce_all(in_order))


def test_reseed_replans_from_a_checkpoint_with_a_new_state():
    s = make_stream(n=10, bs=4, repeats=3, credits=100)
    first = produce_all(s)
    assert isinstance(first[-1], End)
    s.credit(0, 1)
    new = np.random.RandomState(99)
    new.permutation(10)  # the "caller" drew in between
    s.reseed(2, 1, new.get_state())
    assert s.next_seq == 2 and not s.finished and s.generation == 1
    again = produce_all(s)
    assert all(t.generation == 1 for t in again)
    # reference: same plan, state replaced right before batch 2
    rng = CountingRNG(np.random.RandomState(0))
    plan = SequencePlan(10, 4, 3, rng=rng)
    want = [plan.next(), plan.next()]
    rng.rng.set_state(new.get_state())
    while (b := plan.next()) is not None:
        want.append(b)
    got = [t.indices for t in first[:2]] + [t.indices for t in again if isinstance(t, Task)]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_reseed_returns_credit_of_void_batches():
    s = make_stream(n=100, credits=4)
    produce_all(s)
    s.reseed(1, 1, np.random.RandomState(3).get_state())
    assert s.window.statistics().in_flight == 1 and s.window.credits == 3


@pytest.mark.parametrize(
    "call, text",
    [
        (lambda s: s.credit(-1, 0), "credit should grant"),
        (lambda s: s.credit(1, 50), "credit should grant"),
        (lambda s: s.reseed(0, 0, None), "generation should exceed"),
        (lambda s: s.reseed(40, 1, None), "cannot reseed from batch 40"),
    ],
)
def test_illegal_requests_raise_stream_error(call, text):
    s = make_stream(n=100, credits=4)
    produce_all(s)
    with pytest.raises(StreamError, match=text):
        call(s)


def test_window_rejects_empty_grants():
    with pytest.raises(StreamError):
        CreditWindow(0, 10)
