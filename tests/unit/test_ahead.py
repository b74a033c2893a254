"""Streams opened ahead for a loop's next epoch: the bookkeeping (:class:`Ahead`) and
:func:`iterate` taking such a stream over, against a fake connection that runs real
server-side streams in process. Each epoch must still be batchup's, RNG included."""

from __future__ import annotations

import numpy as np
import pytest

import batchup_protocol as proto
from batchup_client.ahead import Ahead, Opened
from batchup_client.sampling import StandardSampler
from batchup_client.streaming import Inbox, iterate
from batchup_protocol.plan import CountingRNG, build_plan
from batchup_server.streams import CreditWindow, End, Stream

# ---------------------------------------------------------------------- Ahead


def test_a_stream_is_opened_ahead_only_for_arguments_seen_before() -> None:
    ahead = Ahead(remembered=2)
    assert not ahead.repeats("a") and ahead.repeats("a")
    assert not ahead.repeats("b") and not ahead.repeats("c")
    assert not ahead.repeats("a")  # forgotten: only the 2 latest are remembered


def test_take_matches_the_arguments_and_the_plan_arrays() -> None:
    ahead = Ahead()
    idx = np.arange(5)
    assert ahead.keep(Opened("k", [idx], 3, None)) == []
    assert ahead.take("other", [idx]) is None
    assert ahead.take("k", [np.arange(6)]) is None  # another subset
    assert ahead.take("k", [idx.astype(np.int32)]) is None  # same values, another dtype
    opened = ahead.take("k", [np.arange(5)])
    assert opened is not None and opened.stream_id == 3
    assert ahead.take("k", [idx]) is None and len(ahead) == 0  # taken once


def test_keep_closes_the_one_it_replaces_and_the_oldest_beyond_the_limit() -> None:
    ahead = Ahead(kept=2)
    assert ahead.keep(Opened("train", [], 1, None)) == []
    assert ahead.keep(Opened("val", [], 2, None)) == []
    assert ahead.keep(Opened("train", [], 3, None)) == [1]  # same arguments: the newer wins
    assert ahead.keep(Opened("test", [], 4, None)) == [2]  # three loops: the oldest goes
    assert sorted(ahead.clear()) == [3, 4] and len(ahead) == 0
    assert ahead.stats["streams_opened_ahead"] == 4 and ahead.stats["streams_ahead_closed"] == 4


def test_arguments_whose_streams_go_unused_twice_in_a_row_get_none() -> None:
    ahead = Ahead(kept=1)
    assert not ahead.repeats("a") and ahead.repeats("a")
    ahead.keep(Opened("a", [], 1, None))
    ahead.keep(Opened("b", [], 2, None))  # evicts a's: one miss
    assert ahead.repeats("a")
    ahead.unused("a")  # taken, but the caller's RNG had moved on: two in a row
    assert not ahead.repeats("a") and not ahead.repeats("a")
    assert not ahead.repeats("c") and ahead.repeats("c")
    ahead.unused("c")
    ahead.taken_over("c")  # a taken stream resets the count
    ahead.unused("c")
    assert ahead.repeats("c")


# ---------------------------------------------------------------------- iterate


class FakeConnection:
    """Several streams, each a real server-side :class:`Stream` run in process; items are
    delivered in order whenever the reader finds none. ``tells_final_rng=False`` is a
    server before protocol 1.6."""

    def __init__(self, tells_final_rng: bool = True):
        self.ahead = Ahead()
        self.tells_final_rng = tells_final_rng
        self.streams: dict[int, tuple[Stream, Inbox]] = {}
        self.opened: list[int] = []
        self.closed: list[int] = []
        self.start_credits: list[int] = []
        self.limits: dict[int, int] = {}  #: credit_batches of each stream
        self.granted: list[tuple[int, int]] = []  #: (stream, batches) of every Credit
        self._payload: dict[tuple[int, int, int], np.ndarray] = {}

    def open_stream(self, source, plan, plan_arrays, batch_size, include_indices, fields, credit_batches,
                    credit_bytes, transforms=None, transform_seed=0, start_credit=-1):  # fmt: skip
        rng = None
        if plan.get("rng") is not None:
            rs = np.random.RandomState()
            rs.set_state(proto.decode_rng_state(plan["rng"]))
            rng = CountingRNG(rs)
        plan_obj = build_plan(plan, batch_size, rng, list(plan_arrays))
        sid = len(self.opened) + 1
        start = credit_batches if start_credit == -1 else start_credit
        assert 1 <= start <= credit_batches
        self.limits[sid] = credit_batches
        self.streams[sid] = (Stream(plan_obj, rng, CreditWindow(start, credit_bytes), 8), Inbox())
        self.opened.append(sid)
        self.start_credits.append(start_credit)
        self._pump(sid)  # a server makes batches as soon as a stream opens
        return sid

    def _pump(self, sid: int) -> None:
        stream, inbox = self.streams[sid]
        while stream.can_produce():
            item = stream.produce()
            if isinstance(item, End):
                final = item.final_rng if self.tells_final_rng else None
                inbox.put(proto.EndOfStream(sid, item.seq, item.generation, item.rng, final), [])
                return
            self._payload[(sid, item.seq, item.generation)] = item.indices
            inbox.put(proto.Batch(sid, item.seq, item.generation, item.rng), [item.indices])

    def next_item(self, stream_id, seq):
        inbox = self.streams[stream_id][1]
        for _ in range(3):
            item = inbox.take(seq)
            if item is not None:
                return item
            self._pump(stream_id)
        raise AssertionError(f"item {seq} of stream {stream_id} never came")

    def ready(self, stream_id, seq):
        return self.streams[stream_id][1].has(seq)

    def pool(self, stream_id):
        return None

    def send_credit(self, stream_id, batches, consumed, freed=()):
        assert stream_id not in self.closed, "credit for a closed stream"
        self.granted.append((stream_id, batches))
        stream = self.streams[stream_id][0]
        stream.credit(batches, consumed)
        # never more than its credit_batches in flight and to come (PROTOCOL.md, Flow control)
        assert stream.window.credits + stream.window.statistics().in_flight <= self.limits[stream_id]
        self._pump(stream_id)  # a server makes batches while the reader reads

    def reseed(self, stream_id, from_seq, generation, rng):
        stream, inbox = self.streams[stream_id]
        inbox.reset(generation, from_seq)
        stream.reseed(from_seq, generation, proto.decode_rng_state(rng))

    def stream_end_state(self, stream_id):
        inbox = self.streams[stream_id][1]
        return None if inbox.end is None else (inbox.end, inbox.final_rng)

    def close_stream(self, stream_id):
        self.closed.append(stream_id)


def epoch(conn, rng, n=23, bs=5, repeats=1, source="x"):
    plan = {"kind": "standard", "length": n, "repeats": repeats}
    return [b for (b,) in iterate(conn, {"name": source}, plan, [], bs, rng=rng, prefetch=4)]


def batchup_epoch(rng, n=23, bs=5, repeats=1):
    return list(StandardSampler(n, repeats).shuffled_indices_batch_iterator(bs, rng))


def assert_same(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("repeats", [1, 2])
def test_a_training_loop_takes_over_the_streams_opened_ahead(repeats: int) -> None:
    conn = FakeConnection()
    mine, ref = np.random.RandomState(5), np.random.RandomState(5)
    for _ in range(5):
        assert_same(epoch(conn, mine, repeats=repeats), batchup_epoch(ref, repeats=repeats))
        assert proto.states_equal(mine.get_state(), ref.get_state())
    # epoch 1 is new; from epoch 2 on each opens the next; epochs 3-5 take theirs over
    assert len(conn.opened) == 6 and conn.ahead.stats["streams_taken_over"] == 3
    assert len(conn.ahead) == 1 and conn.opened[-1] not in conn.closed  # the 6th waits


def test_a_stream_opened_ahead_makes_a_quarter_of_its_credit_until_taken_over() -> None:
    conn = FakeConnection()
    rng = np.random.RandomState(4)
    epoch(conn, rng, n=100, bs=5)
    epoch(conn, rng, n=100, bs=5)  # seen before: the next is opened ahead (prefetch is 4)
    assert conn.start_credits == [-1, -1, 1]  # max(1, 4 // 4): a quarter of what flies
    ahead = conn.opened[2]
    assert len(conn.streams[ahead][1]) == 1  # made that much, and waits
    epoch(conn, rng, n=100, bs=5)  # taken over: the other 3 of its 4 batches of credit, first
    assert conn.granted[[s for s, _ in conn.granted].index(ahead)] == (ahead, 3)


def test_a_draw_between_epochs_closes_the_stream_opened_ahead() -> None:
    conn = FakeConnection()
    mine, ref = np.random.RandomState(8), np.random.RandomState(8)
    for e in range(4):
        assert_same(epoch(conn, mine), batchup_epoch(ref))
        if e >= 1:
            mine.uniform(), ref.uniform()  # the loop draws from the RNG between epochs
    assert proto.states_equal(mine.get_state(), ref.get_state())
    assert conn.ahead.stats["streams_taken_over"] == 0
    assert conn.ahead.stats["streams_ahead_closed"] == 2 and conn.opened[2] in conn.closed


def test_no_stream_is_opened_ahead_when_the_server_does_not_tell_where_its_plan_ends() -> None:
    conn = FakeConnection(tells_final_rng=False)
    mine, ref = np.random.RandomState(2), np.random.RandomState(2)
    for _ in range(3):
        assert_same(epoch(conn, mine), batchup_epoch(ref))
    assert len(conn.opened) == 3 and len(conn.ahead) == 0


def test_streams_without_shuffle_and_other_arguments() -> None:
    conn = FakeConnection()
    for _ in range(3):  # in order: the same batches every epoch
        assert [b.tolist() for b in epoch(conn, None, n=7, bs=3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert conn.ahead.stats["streams_taken_over"] == 1
    rng = np.random.RandomState(1)
    epoch(conn, rng, n=7, bs=3)  # shuffled now: not the stream opened ahead in order
    assert conn.ahead.stats["streams_taken_over"] == 1
    epoch(conn, None, n=7, bs=4)  # another batch size: nor this one
    assert conn.ahead.stats["streams_taken_over"] == 1


def test_the_global_rng_never_opens_ahead() -> None:
    conn = FakeConnection()
    state = np.random.get_state()
    try:
        np.random.seed(3)
        for _ in range(3):
            epoch(conn, np.random.mtrand._rand)
    finally:
        np.random.set_state(state)
    assert len(conn.opened) == 3 and conn.ahead.stats["streams_opened_ahead"] == 0


def test_indices_changed_in_place_between_epochs_are_not_served_from_the_old_ones() -> None:
    """The caller's subset array is the same object, changed in place (hard examples
    mined, a curriculum): the stream opened ahead was planned from the old values."""
    conn = FakeConnection()
    idx = np.arange(0, 20)
    plan = {"kind": "subset", "indices": 0, "repeats": 1}

    def run(rng: np.random.RandomState) -> list[np.ndarray]:
        return [b for (b,) in iterate(conn, {"name": "x"}, plan, [idx], 4, rng=rng, prefetch=4)]

    from batchup_client.sampling import SubsetSampler

    mine, ref = np.random.RandomState(1), np.random.RandomState(1)
    for e in range(4):
        want = list(SubsetSampler(idx.copy(), 1).shuffled_indices_batch_iterator(4, ref))
        assert_same(run(mine), want)
        idx[:] = idx + 20 * (e % 2 == 0)  # shifted after epochs 1 and 3, kept after 2
    assert conn.ahead.stats["streams_taken_over"] == 1  # epoch 4's: planned from unchanged indices


ARGS = {"fields": None, "include_indices": False, "transforms": None, "transform_seed": 0, "prefetch": 4}


@pytest.mark.parametrize(
    "change",
    [
        {"fields": ["X"]},
        {"include_indices": True},
        {"transforms": [{"name": "crop"}]},
        {"transform_seed": 5},
        {"prefetch": 8},
        {"plan": {"kind": "standard", "length": 23, "repeats": 1, "shard": [0, 2]}},
        {"source": "y"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_stream_opened_ahead_serves_only_the_same_arguments(change: dict) -> None:
    conn = FakeConnection()
    loop = np.random.RandomState(3)  # the training loop's RNG

    def run(rng: np.random.RandomState, **kw) -> None:
        args = {**ARGS, **kw}
        plan = args.pop("plan", {"kind": "standard", "length": 23, "repeats": 1})
        source = {"name": args.pop("source", "x")}
        for _ in iterate(conn, source, plan, [], 5, rng=rng, **args):
            pass

    run(loop)
    run(loop)  # seen before: the next is opened ahead, from where loop is now
    assert len(conn.ahead) == 1
    other = np.random.RandomState()
    other.set_state(loop.get_state())  # in that very state, but other arguments
    run(other, **change)
    assert conn.ahead.stats["streams_taken_over"] == 0 and len(conn.ahead) == 1
    run(loop)  # the loop's arguments and RNG: taken over
    assert conn.ahead.stats["streams_taken_over"] == 1


def test_no_stream_is_opened_ahead_of_a_server_that_cannot_take_one() -> None:
    conn = FakeConnection()
    conn.opens_ahead = False  # a server before 1.6 (Client.opens_ahead)
    rng = np.random.RandomState(6)
    for _ in range(3):
        epoch(conn, rng)
    assert len(conn.opened) == 3 and conn.ahead.stats["streams_opened_ahead"] == 0


@pytest.mark.parametrize("with_pool", [True, False], ids=["slot-pool", "frames"])
def test_a_stream_opened_ahead_with_a_slot_pool_gets_all_its_credit_at_once(with_pool: bool) -> None:
    from batchup_client.streaming import _open_ahead

    class Conn:
        def __init__(self) -> None:
            self.opened: list[int] = []
            self.granted: list[tuple[int, int]] = []

        def pool(self, sid):
            return object() if with_pool else None

        def send_credit(self, sid, batches, consumed, freed=()):
            self.granted.append((sid, batches))

        def close_stream(self, sid):
            raise AssertionError("nothing to close")

    conn, ahead = Conn(), Ahead()

    def open_stream(state, start_credit=-1):
        conn.opened.append(start_credit)
        return 7

    _open_ahead(conn, ahead, ("k",), [np.arange(3)], None, None, open_stream, 8, 32)  # type: ignore[arg-type]
    assert conn.opened == [8]  # a quarter of its credit, then
    opened = ahead.take(("k",), [np.arange(3)])
    assert opened is not None
    if with_pool:  # the pool bounds it: the rest at once
        assert conn.granted == [(7, 24)] and opened.held == 0
    else:  # frames: the rest when it is taken over
        assert conn.granted == [] and opened.held == 24
