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


# ---------------------------------------------------------------------- assigned mode
def _assigned(n: int = 20, bs: int = 3, seed: int | None = 4, repeats: int = 1) -> Stream:
    rng = CountingRNG(np.random.RandomState(seed)) if seed is not None else None
    return Stream(SequencePlan(n, bs, repeats, None, rng), rng, CreditWindow(1, 1 << 20), 8, assigned=True)


def _serial(n: int = 20, bs: int = 3, seed: int | None = 4, repeats: int = 1) -> list[Task | End]:
    stream = make_stream(n=n, bs=bs, repeats=repeats, credits=100, seed=seed)
    out: list[Task | End] = []
    while True:
        item = stream.produce()
        out.append(item)
        if isinstance(item, End):
            return out


def _take(stream: Stream, seqs: list[int]) -> list[Task | End]:
    stream.credit(len(seqs), stream.consumed)
    stream.assign(seqs)
    out = []
    while stream.can_produce():
        item = stream.produce()
        if item is not None:
            out.append(item)
    return out


def test_assigned_stream_makes_exactly_the_named_batches_as_a_serial_stream_would() -> None:
    serial = _serial()
    a, b = _assigned(), _assigned()
    got = {t.seq: t for t in _take(a, [0, 2, 3, 6]) + _take(b, [1, 4, 5])}
    for seq, t in got.items():
        assert isinstance(t, Task)
        np.testing.assert_array_equal(t.indices, serial[seq].indices)
        assert (t.rng is None) == (serial[seq].rng is None)
        if t.rng is not None:
            assert states_equal(decode_rng_state(t.rng), decode_rng_state(serial[seq].rng))


def test_assigned_stream_replays_an_earlier_batch_from_its_checkpoint() -> None:
    serial = _serial()
    s = _assigned()
    _take(s, [0, 1, 5])
    (again,) = _take(s, [3])  # another server's batch, lost with it
    np.testing.assert_array_equal(again.indices, serial[3].indices)
    (later,) = _take(s, [6])  # the plan goes on from where it was
    np.testing.assert_array_equal(later.indices, serial[6].indices)


def test_assigned_replays_across_pass_boundaries_match_the_serial_stream() -> None:
    """With repeats, the RNG draws mid-stream (a permutation per pass). Batches replayed
    from before and after those draws (a lost server's, in any order) get the serial
    stream's indices and RNG reports; checkpoints share the RNG state between draws."""
    serial = _serial(n=10, bs=3, repeats=4)
    s = _assigned(n=10, bs=3, repeats=4)
    first = _take(s, [0, 2, 5, 9, 11])
    replayed = _take(s, [7]) + _take(s, [1]) + _take(s, [3, 4]) + _take(s, [10, 6, 8])
    replayed += _take(s, [3]) + _take(s, [7])  # made a third time (their second maker lost too)
    for t in first + replayed:
        assert isinstance(t, Task)
        want = serial[t.seq]
        assert isinstance(want, Task)
        np.testing.assert_array_equal(t.indices, want.indices)
        assert (t.rng is None) == (want.rng is None), t.seq
        if t.rng is not None:
            assert states_equal(decode_rng_state(t.rng), decode_rng_state(want.rng))
    assert sorted({t.seq for t in first + replayed}) == list(range(12))
    assert sum(t.rng is not None for t in first + replayed) >= 3  # draws at several passes
    s = _assigned(n=10, bs=3, repeats=4)  # a replay, then batches past a draw, then a replay
    for t in _take(s, [0, 2, 5]) + _take(s, [1]) + _take(s, [9]) + _take(s, [6]) + _take(s, [7]):
        assert isinstance(t, Task)
        np.testing.assert_array_equal(t.indices, serial[t.seq].indices)  # type: ignore[union-attr]


def test_assigned_stream_reports_the_end_once() -> None:
    serial = _serial()
    end = serial[-1]
    assert isinstance(end, End)
    s = _assigned()
    items = _take(s, [5, end.seq + 2, end.seq + 3])
    assert isinstance(items[-1], End) and items[-1].seq == end.seq
    assert sum(isinstance(i, End) for i in items) == 1
    assert _take(s, [end.seq + 4]) == []


def test_assigned_reseed_of_a_batch_not_reached_applies_when_reached() -> None:
    s = _assigned()
    _take(s, [0])
    s.credit(0, 1)
    new = np.random.RandomState(99).get_state()
    s.reseed(4, 1, new)  # this server has not drawn batch 4 yet
    (t,) = _take(s, [4])
    assert t.generation == 1
    ref = _assigned()
    _take(ref, [3])
    ref.rng.rng.set_state(new)  # type: ignore[union-attr]
    (want,) = _take(ref, [4])
    np.testing.assert_array_equal(t.indices, want.indices)


def test_assigned_reseed_makes_sent_batches_again() -> None:
    s = _assigned()
    _take(s, [0, 1, 2, 3])
    s.credit(0, 2)
    s.reseed(2, 1, np.random.RandomState(7).get_state())
    redo = _take(s, [])
    assert [t.seq for t in redo] == [2, 3] and all(t.generation == 1 for t in redo)


def test_assigned_batches_the_client_read_elsewhere_meanwhile_are_not_made() -> None:
    """Batches queued here that the client took from another server's copy (the reported
    consumed passed them) are dropped: their checkpoints are gone, and nobody wants them."""
    s = _assigned()
    s.credit(6, 0)
    s.assign([1, 3, 5])
    s.credit(0, 4)  # the client read 0..3, batches 1 and 3 from another server's copies
    made = []
    while s.can_produce():
        item = s.produce()
        if item is not None:
            made.append(item.seq)
    assert made == [5]


def test_assign_below_consumed_or_on_a_plain_stream_is_refused() -> None:
    s = _assigned()
    _take(s, [0, 1])
    s.credit(0, 2)
    with pytest.raises(StreamError):
        s.assign([1])
    with pytest.raises(StreamError):
        make_stream().assign([0])


def test_a_client_cannot_ask_a_stream_to_walk_its_plan_far_ahead() -> None:
    """One Credit naming batch 10**15 of an endless plan made the router draw (and keep a
    checkpoint of) every batch up to it: a hang and unbounded memory for every client. An
    assigned stream takes batches up to twice its credit_batches (plus 64) past the
    consumed ones; a plain stream's credit in flight is held to the same bound."""
    rng = CountingRNG(np.random.RandomState(0))
    s = Stream(SequencePlan(12, 5, -1, rng=rng), rng, CreditWindow(4, 1 << 30), 8, True, credit_batches=4)
    with pytest.raises(StreamError, match=r"reach too far: at most 72 batches past the 0 consumed"):
        s.assign([10**15])
    with pytest.raises(StreamError, match="reach too far"):
        s.assign(list(range(73)))  # each one near, but too many at once
    s.assign([71])  # the farthest allowed, made at once
    assert s.can_produce() and s.produce().seq == 71 and s.next_seq == 72
    plain = make_stream(n=1000, credits=4)
    plain.max_ahead = 2 * 4 + 64
    produce_all(plain)  # 4 in flight
    for _ in range(1000):  # granted again and again, nothing consumed: the excess is not granted
        plain.credit(50, 0)
    assert plain.window.credits == 68  # 4 in flight and 68 credits
    assert len(produce_all(plain)) == 68 and not plain.can_produce()
    plain.credit(4, 4)  # consumed batches return their place
    assert plain.window.credits == 4 and len(plain._checkpoints) == 68  # bounded, not 1000 * 50


def test_assigned_stream_with_slots_fills_one_free_slot_per_batch_and_waits_for_more() -> None:
    """Several servers on the client's host (1.4): each assigned batch takes a free slot of
    the stream's pool; with none free the stream waits for the client to free one."""
    s = _assigned()
    free = [0, 1]
    s.use_slots(free, 2)
    first = _take(s, [0, 1, 2])
    assert sorted(t.slot for t in first) == [0, 1] and free == []
    assert not s.can_produce()  # batch 2 is assigned, but every slot is in use
    s.credit(0, 0, [first[0].slot])
    (third,) = _take(s, [])
    assert third.seq == 2 and third.slot == first[0].slot


def test_assigned_stream_past_its_known_end_needs_no_slot() -> None:
    serial = _serial()
    end = serial[-1]
    assert isinstance(end, End)
    s = _assigned()
    free = [0]
    s.use_slots(free, 1)
    (last,) = _take(s, [end.seq - 1])
    assert last.slot == 0 and free == []
    assert _take(s, [end.seq]) == []  # the end is not known yet: finding it waits for a slot
    s.credit(0, 0, [0])
    (item,) = _take(s, [])
    assert isinstance(item, End) and item.seq == end.seq and free == [0]  # no slot taken
    free.clear()  # every slot in use again
    assert _take(s, [end.seq + 1]) == [] and not s.can_produce()  # answered (told once), not stuck


def test_a_slot_task_is_made_again_as_frames_naming_its_slot() -> None:
    """Protocol 1.4: after a worker died, its slot batches go as frames; the slot they had
    is named, not written again (the client may hold it, or have freed it since)."""
    t = Task(4, 1, np.arange(3), None, slot=6)
    again = t.again()
    assert (again.slot, again.supersedes, again.seq, again.generation) == (-1, 6, 4, 1)
    assert again.again() is again  # made again twice: still naming the first slot
    framed = Task(5, 0, np.arange(2), None)
    assert framed.again() is framed  # a frames batch is simply made again


def test_a_credit_naming_a_freed_slot_twice_is_refused() -> None:
    s = make_stream(credits=4)
    free = [0, 1, 2]
    s.use_slots(free, 3)
    a, b = s.produce(), s.produce()
    with pytest.raises(StreamError, match="twice"):
        s.credit(0, 0, [a.slot, a.slot])
    assert len(free) == 1  # nothing returned by a refused credit
    s.credit(0, 0, [a.slot, b.slot])
    assert sorted(free) == [0, 1, 2]


def test_assigned_batch_the_reader_waits_for_goes_first_past_the_byte_budget() -> None:
    """Several servers: batches waiting at the client for another server's batch fill this
    server's byte budget; when that server is lost and its batch comes here, the reader
    waits for it, so it is made first and the budget does not hold it back."""
    rng = CountingRNG(np.random.RandomState(4))
    s = Stream(SequencePlan(20, 3, 1, None, rng), rng, CreditWindow(1, 3 * 8 * 2), 8, assigned=True)
    first = _take(s, [1, 2])  # batch 0 was another server's; these wait at the client
    assert [t.seq for t in first] == [1, 2] and s.window.in_flight_bytes == 2 * 3 * 8
    s.credit(2, 0)
    s.assign([3, 0])  # 0: the lost server's, asked of this one after 3
    made = []
    while s.can_produce():
        made.append(s.produce())
    assert [t.seq for t in made] == [0]  # first, past the full budget; 3 waits for bytes
    serial = _serial()
    np.testing.assert_array_equal(made[0].indices, serial[0].indices)
    s.credit(0, 3)  # the reader took 0, 1, 2: their bytes are free
    (third,) = _take(s, [])
    assert third.seq == 3


def test_a_slot_pool_not_the_byte_budget_bounds_a_pool_streams_batches() -> None:
    """A byte budget smaller than one batch lets one batch fly at a time over the socket;
    with a pool of 4 slots (sized from that budget, at least 4) the slots and the credit
    bound the batches instead: the client reports consumption only as it frees slots, so
    waiting for bytes would wait for a batch the user may be holding."""
    frames = make_stream(n=30, bs=3, credits=10, max_bytes=10)  # a batch is 24 bytes
    assert len(produce_all(frames)) == 1  # one at a time
    pool = make_stream(n=30, bs=3, credits=10, max_bytes=10)
    free = [0, 1, 2, 3]
    pool.use_slots(free, 4)
    made = produce_all(pool)
    assert [t.slot for t in made] == [3, 2, 1, 0] and not pool.can_produce()  # every slot in use
    pool.credit(0, 1, [3])  # the user dropped batch 0: its slot is free
    (again,) = produce_all(pool)
    assert again.seq == 4 and again.slot == 3
    short = make_stream(n=30, bs=3, credits=2, max_bytes=1 << 20)
    short.use_slots([0, 1, 2, 3], 4)
    assert len(produce_all(short)) == 2  # and credit still bounds them


@pytest.mark.parametrize("repeats", [1, 3])
def test_the_end_tells_the_rng_state_the_plan_ends_at(repeats):
    """(1.6) EndOfStream.final_rng: where the caller's RNG is once the stream is read,
    also when the last draw was batches before the end (rng, by contrast, is only what
    the plan drew while finding the end)."""
    s = make_stream(n=10, bs=3, repeats=repeats, credits=100, seed=9)
    end = produce_all(s)[-1]
    ref = np.random.RandomState(9)
    from batchup_client.sampling import StandardSampler  # batchup's generator, mirrored

    assert len(list(StandardSampler(10, repeats).shuffled_indices_batch_iterator(3, ref))) == end.seq
    assert isinstance(end, End) and states_equal(decode_rng_state(end.final_rng), ref.get_state())
    unshuffled = produce_all(make_stream(n=10, bs=3, credits=100, seed=None))[-1]
    assert isinstance(unshuffled, End) and unshuffled.final_rng is None
