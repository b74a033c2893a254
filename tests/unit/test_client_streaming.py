"""The client's stream logic (reorder, RNG parity, credits) against a fake connection."""

from __future__ import annotations

import numpy as np
import pytest

import batchup_protocol as proto
from batchup_client.errors import RemoteException
from batchup_client.streaming import Inbox, UnsupportedShuffle, iterate, resolve_shuffle
from batchup_protocol.plan import CountingRNG, build_plan
from batchup_server.streams import CreditWindow, End, Stream


class FakeServer:
    """Runs a real server-side Stream in process and delivers its items out of order."""

    def __init__(self, shuffle_delivery=True):
        self.credits = []
        self.pumps = 0  #: rounds of making batches (each after the reader found none)
        self.per_pump = 10**9  #: batches made per round (a server's pace)
        self.reseeds = []
        self.closed = []
        self.inbox = Inbox()
        self.shuffle_delivery = shuffle_delivery

    def open_stream(
        self,
        source,
        plan,
        plan_arrays,
        batch_size,
        include_indices,
        fields,
        credit_batches,
        credit_bytes,
        transforms=None,
        transform_seed=0,
        start_credit=-1,
    ):
        assert start_credit == -1  # only a stream opened ahead has one
        rng = None
        if plan.get("rng") is not None:
            rs = np.random.RandomState()
            rs.set_state(proto.decode_rng_state(plan["rng"]))
            rng = CountingRNG(rs)
        self.stream = Stream(
            build_plan(plan, batch_size, rng, list(plan_arrays)),
            rng,
            CreditWindow(credit_batches, credit_bytes),
            8,
        )
        return 1

    def _pump(self):
        self.pumps += 1
        produced = []
        while self.stream.can_produce() and len(produced) < self.per_pump:
            item = self.stream.produce()
            if isinstance(item, End):
                produced.append(proto.EndOfStream(1, item.seq, item.generation, item.rng))
                break
            produced.append(proto.Batch(1, item.seq, item.generation, item.rng))
            self.payload = getattr(self, "payload", {})
            self.payload[(item.seq, item.generation)] = item.indices
        if self.shuffle_delivery:
            produced.reverse()  # arrive out of order
        for msg in produced:
            arrays = [self.payload[(msg.seq, msg.generation)]] if isinstance(msg, proto.Batch) else []
            self.inbox.put(msg, arrays)

    def next_item(self, stream_id, seq):
        for _ in range(3):
            item = self.inbox.take(seq)
            if item is not None:
                return item
            self._pump()
        raise AssertionError(f"batch {seq} never came")

    def ready(self, stream_id, seq):
        return self.inbox.has(seq)

    def pool(self, stream_id):
        return None  # batches as frames

    def send_credit(self, stream_id, batches, consumed, freed=()):
        self.credits.append((batches, consumed))
        self.stream.credit(batches, consumed)

    def reseed(self, stream_id, from_seq, generation, rng):
        self.reseeds.append(from_seq)
        self.inbox.reset(generation, from_seq)
        self.stream.reseed(from_seq, generation, proto.decode_rng_state(rng))

    def close_stream(self, stream_id):
        self.closed.append(stream_id)


def ref_batches(n, bs, repeats, rng, count=None, between=None):
    from batchup_client.sampling import StandardSampler

    it = StandardSampler(n, repeats).shuffled_indices_batch_iterator(bs, rng)
    out = []
    for i, b in enumerate(it):
        out.append(b)
        if between:
            between(rng, i)
        if count and len(out) == count:
            break
    return out


def run(n, bs, repeats, rng, prefetch=4, count=None, between=None):
    fake = FakeServer()
    plan = {"kind": "standard", "length": n, "repeats": repeats}
    out = []
    gen = iterate(fake, {"name": "x"}, plan, [], bs, rng=rng, prefetch=prefetch)
    for i, (b,) in enumerate(gen):
        out.append(b)
        if between:
            between(rng, i)
        if count and len(out) == count:
            gen.close()
            break
    return out, fake


def test_batches_and_rng_match_batchup_with_out_of_order_delivery():
    got, fake = run(23, 5, 3, np.random.RandomState(7), prefetch=4)
    r = np.random.RandomState(7)
    want = ref_batches(23, 5, 3, r)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert fake.closed == [1]
    assert all(b >= 1 for b, _ in fake.credits)


def test_caller_drawing_between_batches_triggers_a_replan_with_batchups_result():
    def between(rng, i):
        if i % 2 == 0:
            rng.uniform()

    r1, r2 = np.random.RandomState(3), np.random.RandomState(3)
    got, fake = run(7, 3, 5, r1, prefetch=8, between=between)
    want = ref_batches(7, 3, 5, r2, between=between)
    assert len(got) == len(want) and fake.reseeds
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert proto.states_equal(r1.get_state(), r2.get_state())


def test_abandoned_iterator_leaves_the_rng_where_batchup_would():
    r1, r2 = np.random.RandomState(11), np.random.RandomState(11)
    run(10, 4, -1, r1, prefetch=16, count=7)
    ref_batches(10, 4, -1, r2, count=7)
    assert proto.states_equal(r1.get_state(), r2.get_state())


def test_remote_error_surfaces_from_next():
    class Failing(FakeServer):
        def next_item(self, stream_id, seq):
            return proto.Error(9, "disk on fire", 0, 1, seq, "OSError", "Traceback ..."), []

    gen = iterate(Failing(), {"name": "x"}, {"kind": "standard", "length": 5}, [], 2, rng=None)
    with pytest.raises(RemoteException, match="OSError: disk on fire") as info:
        next(gen)
    assert info.value.remote_traceback == "Traceback ..."


def test_inbox_drops_stale_generations_and_duplicates():
    box = Inbox()
    box.put(proto.Batch(1, 0, 0), ["a"])
    box.put(proto.Batch(1, 0, 0), ["dup"])
    box.put(proto.Batch(1, 1, 0), ["b"])
    box.reset(1, 1)
    box.put(proto.Batch(1, 2, 0), ["stale"])
    box.put(proto.Batch(1, 1, 1), ["new"])
    assert box.take(0)[1] == ["a"] and box.take(1)[1] == ["new"] and box.take(2) is None


def test_inbox_drops_a_duplicate_that_comes_after_its_original_was_taken():
    """A batch recomputed after a worker died may arrive when the user already has the
    first copy; kept, it would sit in the inbox for ever (pinning its shared-memory slot)."""
    box = Inbox()
    box.put(proto.Batch(1, 0, 0), ["a"])
    box.put(proto.Batch(1, 1, 0), ["b"])
    assert box.take(0)[1] == ["a"] and box.take(1)[1] == ["b"]
    box.put(proto.Batch(1, 0, 0), ["late copy"])
    assert len(box) == 0
    box.reset(1, 1)  # replanned from 1: batch 1 comes again, of the new generation
    box.put(proto.Batch(1, 1, 1), ["replanned"])
    assert box.take(1)[1] == ["replanned"]


def test_inbox_reset_names_the_void_batches_taken_or_waiting():
    """What a reseed voids here: the batch just taken (its RNG told the reader of the draw)
    and those waiting from it on; a several-servers client asks live servers for them again
    when the server that made them is lost."""
    box = Inbox()
    for seq in (0, 1, 3, 5):
        box.put(proto.Batch(1, seq, 0), [seq])
    assert box.take(0)[1] == [0] and box.take(1)[1] == [1]
    assert box.reset(1, 1) == [1, 3, 5]
    assert len(box) == 0 and box.reset(2, 1) == []  # nothing taken or waiting from 1 since
    other = Inbox()  # a stream that made none of them
    other.put(proto.Batch(1, 2, 0), [2])
    assert other.reset(1, 1) == [2]


def test_inbox_passed_to_a_batch_drops_what_came_from_elsewhere():
    """A fanned-out stream's batch read from another server's copy: this server's copy,
    waiting or late, is dropped (its slot freed), and a reseed does not name an end."""
    box = Inbox()
    for seq in (0, 1, 2, 4):
        box.put(proto.Batch(1, seq, 0), [seq])
    assert box.take(0)[1] == [0]
    box.pass_to(3)  # batches 1 and 2 were handed out from another server's stream
    assert not box.holds(1) and not box.holds(2) and box.holds(4)
    assert box.passed(0) and box.passed(2) and not box.passed(3) and not Inbox().passed(0)
    box.put(proto.Batch(1, 2, 0), ["late"])
    assert not box.holds(2)
    box.put(proto.EndOfStream(1, 5, 0), [])
    assert box.reset(1, 4) == [4]  # the end is told again by the server that reaches it


def test_resolve_shuffle():
    assert resolve_shuffle(None) is None and resolve_shuffle(False) is None
    assert resolve_shuffle(True) is np.random.mtrand._rand
    rs = np.random.RandomState(0)
    assert resolve_shuffle(rs) is rs
    for bad in (1, np.True_, "yes"):
        with pytest.raises(AttributeError):
            resolve_shuffle(bad)
        with pytest.raises(TypeError, match="shuffle should be"):
            resolve_shuffle(bad)
    with pytest.raises(UnsupportedShuffle):
        resolve_shuffle(np.random.default_rng(0))


def test_byte_budget_below_the_credit_batching_never_deadlocks():
    """Only 2 batches fit the byte budget while batch credit would be returned every 8:
    the client reports what it consumed often enough (a quarter of what the budget lets
    fly, or before it waits) for the server never to wait for bytes the client holds."""

    fake = FakeServer(shuffle_delivery=False)
    budget = 2 * 8 * 5  # bytes for two batches of 5 rows of 8 bytes
    gen = iterate(
        fake,
        {"name": "x"},
        {"kind": "standard", "length": 100},
        [],
        5,
        rng=None,
        prefetch=32,
        prefetch_bytes=budget,
    )
    assert sum(1 for _ in gen) == 20
    assert fake.credits and all(b >= 1 for b, _ in fake.credits)


def test_a_reader_reports_credit_every_grant_every_batches_when_the_bytes_allow():
    """Batches come a few at a time while the reader keeps up: it waits often, but reports
    consumed batches only every grant_every (2 here): a report before every wait made the
    server cut its work into tasks of one or two batches."""
    fake = FakeServer(shuffle_delivery=False)
    fake.per_pump = 3
    gen = iterate(fake, {"name": "x"}, {"kind": "standard", "length": 100}, [], 5, rng=None, prefetch=8)
    np.testing.assert_array_equal(np.concatenate([b for (b,) in gen]), np.arange(100))
    assert fake.pumps > 20 // 3  # it waited for batches again and again
    assert fake.credits and {b for b, _ in fake.credits} == {2}, fake.credits


def test_a_duplicate_of_this_generation_is_known_before_its_slot_is_mapped():
    """The client must not map a duplicate's slot (it is the first copy's): dropping the
    duplicate's views would free the slot while the user holds the first copy."""
    box = Inbox()
    box.put(proto.Batch(1, 0, 0, slot=3), ["first"])
    assert box.duplicate(proto.Batch(1, 0, 0, slot=3))  # waiting in the inbox
    assert box.take(0)[1] == ["first"]
    assert box.duplicate(proto.Batch(1, 0, 0, slot=3))  # already handed out
    assert not box.duplicate(proto.Batch(1, 1, 0, slot=4))
    box.reset(1, 0)
    assert not box.duplicate(proto.Batch(1, 0, 1, slot=5))  # replanned: a new batch
    assert not box.duplicate(proto.Batch(1, 0, 0, slot=3))  # stale generation: dropped by put, slot freed


def test_inbox_copy_out_replaces_slot_views_and_leaves_frames():
    """Several servers: batches waiting for another server's batch are copied out of their
    shared-memory slots (the views are dropped, so the slots can be freed)."""
    box = Inbox()
    slot_view = np.arange(4.0)
    framed = np.arange(3.0)
    box.put(proto.Batch(1, 2, 0, slot=5, layout=[]), [slot_view])
    box.put(proto.Batch(1, 3, 0), [framed])
    assert box.copy_out() == 1
    assert box.copy_out() == 0  # copied once: it is in no slot now
    (copied,) = box.take(2)[1]
    np.testing.assert_array_equal(copied, slot_view)
    assert copied is not slot_view and not np.shares_memory(copied, slot_view)
    assert box.take(3)[1][0] is framed


def test_a_superseded_slot_is_freed_once_even_if_its_first_making_comes_late(tmp_path):
    """Protocol 1.4: a batch made again in place of a first making that had not come frees
    that first making's slot; if the first making arrives after all (its stream closed, or
    replanned), the client recognises it and neither reads nor frees its slot again."""
    from batchup_client.streaming import SlotPool

    path = tmp_path / "pool.bin"
    path.write_bytes(bytes(4 * 4096))
    pool = SlotPool(str(path), 4, 4096)
    pool.free_superseded(stream_id=3, seq=7, slot=2)
    assert pool.take_freed() == [2]
    assert not pool.late_first_making(3, 8, 2)  # another batch: not it
    assert not pool.late_first_making(4, 7, 2)  # another stream: not it
    assert pool.late_first_making(3, 7, 2)  # the late first making
    assert not pool.late_first_making(3, 7, 2)  # once
    assert pool.take_freed() == []


def test_a_batch_made_again_that_the_fanned_out_reader_passed_frees_its_slot_once(tmp_path):
    """A fanned-out stream's reader took batch 3 from another server's copy. This server's
    worker died making it: the batch made again (frames, naming slot S) frees S unless the
    first making came into S (then S was freed as passed, and is not freed twice), and a
    first making that comes later frees nothing. In every order, each slot comes back once."""
    from batchup_client.streaming import SlotPool, admit_batch

    path = tmp_path / "pool.bin"
    path.write_bytes(bytes(8 * 4096))
    pool = SlotPool(str(path), 8, 4096)

    def first(seq, slot):
        return proto.Batch(1, seq, 0, None, slot, [["<f4", [1], 0]])

    def again(seq, slot):
        return proto.Batch(1, seq, 0, supersedes=slot)

    # the first making never came (its worker died before sending it): S freed by the remake
    box = Inbox()
    box.pass_to(5)
    assert not admit_batch(again(3, 2), box, pool, closed=False) and pool.take_freed() == [2]
    assert not admit_batch(first(3, 2), box, pool, closed=False)  # late after all: not freed again
    assert pool.take_freed() == []
    # the first making came after the reader passed it (freed then): the remake frees nothing
    box = Inbox()
    box.pass_to(5)
    assert not admit_batch(first(3, 1), box, pool, closed=False) and pool.take_freed() == [1]
    assert not admit_batch(again(3, 1), box, pool, closed=False) and pool.take_freed() == []
    # the first making was waiting when the reader passed it (its views freed S): same
    box = Inbox()
    assert admit_batch(first(3, 4), box, pool, closed=False)
    box.put(first(3, 4), ["views of slot 4"])
    assert box.pass_to(5) == [] and not box.holds(3)
    assert not admit_batch(again(3, 4), box, pool, closed=False) and pool.take_freed() == []
    # the remake was waiting when the reader passed it: its caller frees S (Client.pass_to)
    box = Inbox()
    assert admit_batch(again(3, 5), box, pool, closed=False)
    box.put(again(3, 5), ["frames"])
    assert box.pass_to(5) == [(3, 5)]
    pool.free_superseded(1, 3, 5)
    assert pool.take_freed() == [5]
    assert not admit_batch(first(3, 5), box, pool, closed=False) and pool.take_freed() == []
    # a remake of a replanned generation: it cannot tell whether its first making came (the
    # user may hold that slot): dropped, the slot kept
    box = Inbox()
    box.reset(1, 0)
    box.pass_to(5)
    assert not admit_batch(again(3, 3), box, pool, closed=False) and pool.take_freed() == []
    # not passed: a slot batch is admitted, and a remake of it is a duplicate
    assert admit_batch(first(6, 6), box, pool, closed=False)
    box.put(first(6, 6), ["views of slot 6"])
    assert not admit_batch(again(6, 6), box, pool, closed=False) and pool.take_freed() == []
    # a closed stream: a late slot batch frees its slot; with no pool left, nothing to free
    assert not admit_batch(first(7, 7), None, pool, closed=True) and pool.take_freed() == [7]
    assert not admit_batch(first(7, 7), None, None, closed=True)
    with pytest.raises(proto.ProtocolError, match="which has no pool"):
        admit_batch(first(7, 7), box, None, closed=False)


@pytest.mark.parametrize(("peer", "tells"), [([1, 5], True), ([1, 9], True), ([1, 4], False), (None, False)])
def test_only_a_15_server_tells_its_credit_limit(peer, tells):
    """A client asks a server before 1.5 for the 32 batches clients always asked (its limit
    is an option the client cannot see); a 1.5 server says its limit in Welcome."""
    from batchup_client.connection import OLD_SERVER_CREDIT

    assert proto.tells_credit_limit(peer) is tells
    assert OLD_SERVER_CREDIT == 32


@pytest.mark.parametrize(("peer", "opens"), [([1, 6], True), ([1, 9], True), ([1, 5], False), (None, False)])
def test_streams_are_opened_ahead_only_of_a_16_server(peer, opens):
    """A 1.5 server tells no final RNG state and would ignore start_credit (a stream opened
    ahead would make its whole window for nothing)."""
    assert proto.opens_ahead(peer) is opens


@pytest.mark.parametrize(("peer", "knows"), [([1, 4], True), ([1, 9], True), ([1, 3], False), ("x", False)])
def test_only_a_14_client_gets_batches_made_again_as_frames(peer, knows):
    assert proto.knows_supersedes(peer) is knows


def test_slot_batches_are_writable_views_that_free_their_slot_when_the_last_one_goes(tmp_path):
    """A slot batch's arrays view the shared slot (what the server wrote is what the user
    reads, and their writes stay in the slot); the slot is reported free only once every
    array of the batch is gone, whichever goes last; a bad layout is a MalformedFrame."""
    import gc

    from batchup_client.streaming import SlotPool

    slot_bytes = 4096
    path = tmp_path / "pool.bin"
    path.write_bytes(bytes(4 * slot_bytes))
    pool = SlotPool(str(path), 4, slot_bytes)
    layout, used = proto.arrays.slot_layout([(np.dtype("<f4"), (4, 3)), (np.dtype(">i8"), (4,))])
    with open(path, "r+b") as f:  # what a worker wrote into slot 2
        f.seek(2 * slot_bytes + layout[1][2])
        f.write(np.arange(4, dtype=">i8").tobytes())
    X, y = pool.hand_out(pool.arrays(2, layout))
    assert X.shape == (4, 3) and X.dtype == np.dtype("<f4") and X.flags.writeable
    assert y.dtype == np.dtype(">i8") and y.tolist() == [0, 1, 2, 3]
    assert proto.arrays.slot_owner(X) is proto.arrays.slot_owner(y) is not None
    assert proto.arrays.slot_owner(np.zeros(3)) is None
    X += 1.5
    (X2, _) = pool.arrays(2, layout)
    assert (X2 == 1.5).all()  # the same memory
    del X2, _
    gc.collect()
    pool.take_freed()  # that second mapping's lease
    del X
    gc.collect()
    assert pool.take_freed() == []  # y still holds the slot
    del y
    gc.collect()
    assert pool.take_freed() == [2]
    for bad in ([["<f4", [4, 3], slot_bytes]], [["<f4", [4, -3], 0]], "not a list", [["<f4", [4]]]):
        with pytest.raises(proto.MalformedFrame):
            pool.arrays(1, bad)
