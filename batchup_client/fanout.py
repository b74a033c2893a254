"""Several servers feeding one trainer: ``connect(["tcp://a:5555", "tcp://b:5555"])``.

A stream's batches are a deterministic plan (sequence number → indices → transform seed),
so any server holding the same data can make any batch. :class:`FanoutClient` opens each
stream on every server in *assigned* mode and hands out sequence numbers itself: the next
batch goes to the server with the fewest batches outstanding, so a faster server does
more. Batches are merged by sequence number, so the trainer sees exactly the batches,
in the order, one server would give — RNG parity, reseeds and transforms included.

A server that stops answering heartbeats (``server_timeout``) is dropped and its
outstanding batches are assigned to the others; a background thread keeps trying to
reconnect it, and once back it makes batches again: of the streams opened from then on,
and of the open ones (each is opened on it anew and is handed its share of the next
batches), except a stream that was replanned (a reseed: the returned server could not
reach the replanned state).

The class speaks the connection interface :func:`batchup_client.streaming.iterate` uses,
so everything above it (sources, drop-ins, maps, sharding) works unchanged. Sockets stay
in :mod:`batchup_client.connection`.

Servers on the trainer's host fill shared-memory slots of a pool per stream and server
(protocol 1.4). Credit stays per batch (``Credit.assign``): a server is asked again once
half its share came in, and freed slots go back with that request (or, half the pool at a
time, topping its share up with them; or before a wait when the server may be short, or
after a wait in vain of :data:`WAIT_SLICE_S`). A batch that waits
for another server's earlier batch holds its slot; before a wait, a server with batches
to make and too few free slots has its waiting batches copied out of their slots, so it
can go on.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .ahead import Ahead
from .connection import Client as _Conn
from .connection import _live_fanouts, wait_any
from .errors import BatchupError, ClientClosed, ConnectionLost
from .keys import CurveClientKeys
from .remote import SourceMethods

__all__ = ["FanoutClient"]

log = logging.getLogger("batchup_client")
RECONNECT_EVERY_S = 2.0
WAIT_SLICE_S = 0.05
STUCK_S = 1.0  #: waited this long in vain: copy waiting batches out of slots a server may lack


def _credit_limit(live: list[tuple[str, _Conn]]) -> int:
    """The largest credit every one of these servers accepts."""
    return min((conn.max_credit_batches for _, conn in live), default=1)


@dataclasses.dataclass
class _Fan:
    """One stream, fanned out over the servers."""

    open_args: tuple[Any, ...]
    streams: dict[str, tuple[_Conn, int]]  #: server address → (its connection, stream id)
    outstanding: dict[str, set[int]]  #: batches asked of each live server and not received
    allowed: int  #: batches may be asked up to (not including) this sequence number
    cap: int  #: batches a server may have outstanding: a faster server empties its share sooner
    next_seq: int = 0  #: the first batch never asked for
    requeue: collections.deque[int] = dataclasses.field(default_factory=collections.deque)
    consumed: int = 0  #: as last reported to the servers
    read: int = 0  #: the batch the reader is at: every earlier one was handed out
    end: int | None = None  #: the stream's length, once a server reported it
    reseeds: list[tuple[int, int, dict[str, Any]]] = dataclasses.field(default_factory=list)
    #: streams on connections that were lost and replaced: their received batches still count
    retired: list[tuple[_Conn, int]] = dataclasses.field(default_factory=list)

    def every_stream(self) -> list[tuple[_Conn, int]]:
        return [*self.streams.values(), *self.retired]

    def has(self, seq: int) -> tuple[_Conn, int] | None:
        """The stream holding batch ``seq`` (or the live stream failing); a lost server's
        stream counts only for batches it delivered (its failure is its loss, handled)."""
        for address, (conn, sid) in self.streams.items():
            if conn.ready(sid, seq) if address in self.outstanding else conn.holds(sid, seq):
                return conn, sid
        return next(((c, s) for c, s in self.retired if c.holds(s, seq)), None)


class FanoutClient(SourceMethods):
    """A client of several servers with the same sources; see the module docstring."""

    def __init__(
        self,
        addresses: Sequence[str],
        curves: Mapping[str, CurveClientKeys | None] | None = None,
        **connect_kwargs: Any,
    ):
        """``curves``: each address's CURVE keys (servers may have key pairs of their own)."""
        if not addresses:
            raise ValueError("connect() needs at least one address")
        self.addresses = list(dict.fromkeys(addresses))
        default = connect_kwargs.pop("curve", None)  # one set of keys for every server
        self._kwargs = connect_kwargs
        self._curves = {a: (curves or {}).get(a, default) for a in self.addresses}
        self._conns: dict[str, _Conn] = {}
        #: the arrays behind keys sent to any server (weakly), shared by every connection: a
        #: server that comes back, or that deleted one unused, is sent it again
        self._sent_arrays: dict[str, Any] = {}
        errors = []
        for address in self.addresses:
            try:
                self._conns[address] = _Conn(address, curve=self._curves.get(address), **connect_kwargs)
                self._conns[address]._sent_arrays = self._sent_arrays
            except BatchupError as exc:
                errors.append(f"{address}: {exc}")
        if not self._conns:
            raise ConnectionLost("no batchup-server answered:\n  " + "\n  ".join(errors))
        for e in errors:
            log.warning("server unavailable, will retry: %s", e)
        self._shm: bool | None = None  #: shared_memory_batches for every connection (None: theirs)
        self._retired: list[_Conn] = []  #: replaced connections, kept while streams read them
        self.prefetch: tuple[int, int] = (32, 128 << 20)
        #: next epochs' streams opened ahead (see :mod:`batchup_client.ahead`)
        self.ahead = Ahead()
        self._fans: dict[int, _Fan] = {}
        self._next_sid = 0
        self._closed = False
        self._pid = os.getpid()  #: a forked child's copy leaves the parent's threads and sockets be
        self._back: collections.deque[tuple[str, _Conn]] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reconnector = threading.Thread(
            target=self._reconnect_loop, name="batchup-reconnect", daemon=True
        )
        self._reconnector.start()
        _live_fanouts.add(self)

    @property
    def max_credit_batches(self) -> int:
        """The largest credit every live server accepts (a stream's prefetch is cut to it)."""
        return _credit_limit(self._alive())

    # ------------------------------------------------------------------ servers
    def _alive(self) -> list[tuple[str, _Conn]]:
        self._adopt_returned()
        live = [(a, c) for a, c in self._conns.items() if c.alive()]
        if not live:
            raise ConnectionLost(f"none of the servers {self.addresses} answers")
        return live

    def _first(self) -> _Conn:
        return self._alive()[0][1]

    def _reconnect_loop(self) -> None:
        while not self._stop.wait(RECONNECT_EVERY_S):
            for address in self.addresses:
                conn = self._conns.get(address)
                if conn is not None and conn.alive():
                    continue
                if any(a == address for a, _ in list(self._back)):
                    continue
                try:
                    fresh = _Conn(
                        address,
                        curve=self._curves.get(address),
                        **{**self._kwargs, "timeout": min(2.0, self._kwargs.get("timeout", 2.0))},
                    )
                except BatchupError:
                    continue
                with self._lock:
                    if not self._stop.is_set():
                        self._back.append((address, fresh))
                        log.warning("server %s answers again", address)
                        continue
                fresh.close()  # closed meanwhile: nobody would adopt it
                return

    def _adopt_returned(self) -> None:
        with self._lock:
            returned = list(self._back)
            self._back.clear()
        for address, conn in returned:
            old = self._conns.get(address)
            if old is not None:
                self._retired.append(old)  # its streams' received batches stay readable
            if self._shm is not None:
                conn.shared_memory_batches = self._shm
            conn._sent_arrays = self._sent_arrays
            self._conns[address] = conn

    @property
    def shared_memory_batches(self) -> bool:
        """Whether servers on this host put batches in shared-memory slots (each connection
        decides for itself: a server on another host always sends frames)."""
        return all(c.shared_memory_batches for c in self._conns.values())

    @shared_memory_batches.setter
    def shared_memory_batches(self, value: bool) -> None:
        self._shm = bool(value)
        for conn in self._conns.values():
            conn.shared_memory_batches = self._shm

    @property
    def trusts_code(self) -> bool:
        return all(c.trusts_code for _, c in self._alive())

    @property
    def transforms(self) -> list[str]:
        return sorted(set.intersection(*(set(c.transforms) for _, c in self._alive())))

    # ------------------------------------------------------------------ one-off requests
    def _any(self, call: Any) -> Any:
        last: Exception | None = None
        for _, conn in self._alive():
            try:
                return call(conn)
            except ConnectionLost as exc:
                last = exc
        raise ConnectionLost(f"no server could answer: {last}")

    def describe(self, source: dict[str, Any], wait: float | None = None) -> Any:
        return self._any(lambda c: c.describe(source, wait))

    def gather(self, source: dict[str, Any], indices: Any, fields: list[str] | None) -> list[Any]:
        return self._any(lambda c: c.gather(source, indices, fields))  # type: ignore[no-any-return]

    def register_code(self, fn: Any) -> str:
        keys = {c.register_code(fn) for _, c in self._alive()}
        return keys.pop()

    def ensure_arrays(self, data: list[Any], keys: list[str] | None = None) -> list[str]:
        out: list[str] = []
        for _, conn in self._alive():
            out = conn.ensure_arrays(data, keys)
        return out

    # ------------------------------------------------------------------ streams
    def open_stream(
        self,
        source: dict[str, Any],
        plan: dict[str, Any],
        plan_arrays: Any,
        batch_size: int,
        include_indices: bool,
        fields: list[str] | None,
        credit_batches: int,
        credit_bytes: int,
        transforms: list[dict[str, Any]] | None = None,
        transform_seed: int = 0,
        start_credit: int = -1,
    ) -> int:
        """``start_credit``: of ``credit_batches``, the batches asked of the servers before
        the first :meth:`send_credit` (-1: all; a stream opened ahead)."""
        live = self._alive()
        limit = _credit_limit(live)  # what every server accepts
        cap = max(1, min(max(2, -(-credit_batches // (2 * len(live)))), limit // 2))
        args = (
            source,
            plan,
            plan_arrays,
            batch_size,
            include_indices,
            fields,
            # a server makes only the batches assigned to it; this sizes its slot pool (same
            # host): its share in flight (cap) and as many waiting here for their turn; never
            # more than a server accepts (Welcome.max_credit_batches)
            min(credit_batches, 2 * cap, limit),
            credit_bytes,
            transforms,
            transform_seed,
        )
        streams: dict[str, tuple[_Conn, int]] = {}
        refused: list[tuple[str, BatchupError]] = []
        for address, conn in live:
            try:
                streams[address] = (conn, conn.open_stream(*args, assigned=True))
            except ConnectionLost:
                continue
            except BatchupError as exc:  # the others may make the stream alone
                refused.append((address, exc))
        if not streams:
            if refused:
                raise refused[0][1]
            raise ConnectionLost(f"no server could open the stream ({self.addresses})")
        for address, why in refused:
            log.warning("server %s cannot open the stream, the others make it: %s", address, why)
        self._next_sid += 1
        allowed = credit_batches if start_credit < 0 else min(start_credit, credit_batches)
        fan = self._fans[self._next_sid] = _Fan(args, streams, {a: set() for a in streams}, allowed, cap)
        self._pump(fan)  # the servers' first shares, at once (a stream opened ahead: only those)
        return self._next_sid

    def pool(self, stream_id: int) -> None:
        return None  # each server's stream has its own pool, handled here (credit is per batch)

    def _fan(self, stream_id: int) -> _Fan:
        fan = self._fans.get(stream_id)
        if fan is None:
            raise ClientClosed(f"stream {stream_id} is closed")
        return fan

    def _rejoin(self, fan: _Fan) -> None:
        """Open the stream anew on servers that came back since they were lost."""
        self._adopt_returned()
        if fan.reseeds:
            return  # replanned: a fresh stream on the returned server would not match it
        for address, conn in list(self._conns.items()):
            old = fan.streams.get(address)
            if address in fan.outstanding or old is None or old[0] is conn or not conn.alive():
                continue
            try:
                sid = conn.open_stream(*fan.open_args, assigned=True)  # type: ignore[misc]
            except BatchupError as exc:
                log.warning("server %s is back but cannot reopen a stream: %s", address, exc)
                continue
            fan.retired.append(old)
            fan.streams[address] = (conn, sid)
            fan.outstanding[address] = set()
            log.warning("server %s is back: it makes batches of an open stream again", address)

    def _pump(self, fan: _Fan, waiting: bool = False, waited: float = 0.0) -> None:
        """Drop dead servers (their batches not yet received go back in the queue), take
        back returned ones, and ask the live ones for more batches, each up to its cap of
        outstanding batches, handing back freed slots with the request (``waiting``: the
        reader is about to wait)."""
        self._rejoin(fan)
        for address in list(fan.outstanding):
            conn, sid = fan.streams[address]
            if not conn.alive():  # what it sent stays readable; the rest goes to the others
                lost = sorted(
                    s for s in fan.outstanding.pop(address) if s >= fan.read and not conn.holds(sid, s)
                )
                if lost:
                    log.warning("server %s is lost: asking the others for batches %s", address, lost[:8])
                fan.requeue.extendleft(reversed(lost))
                continue
            # batches that came (also while another stream waited), or that were read from
            # another server's copy, are outstanding no more
            conn.pass_to(sid, fan.read)
            fan.outstanding[address] = {
                s for s in fan.outstanding[address] if s >= fan.read and not conn.ready(sid, s)
            }
        if fan.requeue:
            fan.requeue = collections.deque(s for s in fan.requeue if s >= fan.read)
        if not fan.outstanding:
            raise ConnectionLost(f"every server of this stream is lost ({self.addresses})")
        for conn, sid in fan.streams.values():
            end = conn.stream_end(sid)
            if end is not None and (fan.end is None or end < fan.end):
                fan.end = end
        if fan.end is not None:  # batches past the end are answered by no one: forget them
            for address in fan.outstanding:
                fan.outstanding[address] = {s for s in fan.outstanding[address] if s <= fan.end}
            fan.requeue = collections.deque(s for s in fan.requeue if s <= fan.end)
        limit = fan.allowed if fan.end is None else min(fan.allowed, fan.end + 1)
        asks: dict[str, list[int]] = collections.defaultdict(list)

        # a server is topped up to its cap once half its share came in: several batches per
        # request, which its router hands a worker as one task (one message, not one a batch)
        def load(a: str) -> int:
            return len(fan.outstanding[a]) + len(asks[a])

        room = set(fan.outstanding)  # a lost server's batches: to any server under its cap, now
        while room and fan.requeue:
            address = min(room, key=load)
            if load(address) >= fan.cap:
                room.discard(address)
                continue
            asks[address].append(fan.requeue.popleft())
        # a server is due once half its share came in; one that is sent freed slots anyway
        # is topped up with them (one message, not two: the slots, then the request soon after)
        more = fan.next_seq < limit
        due = {a for a in room if len(fan.outstanding[a]) <= fan.cap // 2}
        freed = {
            a: self._slots_back(fan, a, bool(asks[a]) or (more and a in due), waiting, waited)
            for a in fan.outstanding
        }
        room = due | {a for a in room if freed[a]}
        while room and fan.next_seq < limit:
            address = min(room, key=load)
            if load(address) >= fan.cap:
                room.discard(address)  # its share is in flight
                continue
            asks[address].append(fan.next_seq)
            fan.next_seq += 1
        for address in fan.outstanding:  # the live servers: one Credit each, when needed
            seqs = asks.get(address, [])
            if not seqs and not freed[address]:
                continue
            fan.outstanding[address].update(seqs)
            conn, sid = fan.streams[address]
            try:
                conn.assign(sid, seqs, fan.consumed, freed[address])
            except ConnectionLost:
                pass  # noticed on the next round

    def ready(self, stream_id: int, seq: int) -> bool:
        fan = self._fan(stream_id)
        return fan.has(seq) is not None

    def next_item(self, stream_id: int, seq: int) -> tuple[Any, list[Any]]:
        fan = self._fan(stream_id)
        fan.read = max(fan.read, seq)
        started = time.monotonic()
        waited = 0.0  # seconds waited in vain for batch seq (a wake-up for another batch is not one)
        while True:
            self._pump(fan, waiting=fan.has(seq) is None, waited=waited)
            found = fan.has(seq)  # a lost server's received batches count too
            if found is not None:
                conn, sid = found
                msg, arrays = conn.next_item(sid, seq)
                pool = conn.pool(sid)
                if pool is not None and arrays:  # copies when the user holds nearly every slot
                    arrays = list(pool.hand_out(arrays))
                return msg, arrays
            wait_any([fan.streams[a][0] for a in fan.outstanding], WAIT_SLICE_S)
            waited = time.monotonic() - started

    @staticmethod
    def _slots_back(fan: _Fan, address: str, asking: bool, waiting: bool, waited: float = 0.0) -> list[int]:
        """The shared-memory slots to hand back to a server with this round's request: those
        freed here since it last heard, when it is asked for batches anyway, when half of
        its pool is free, when the reader is about to wait and the server may be short
        of slots, or after a wait in vain (a miscount costs a wait slice, not a hang). When
        it may be short, or the reader waited in vain for :data:`STUCK_S`, and it has
        batches to make, the batches it made that wait here for their turn (another
        server's batch comes first) are copied out of their slots first: held, they could
        wait for a batch it cannot make without a slot. Copy out rather than block."""
        conn, sid = fan.streams[address]
        pool = conn.pool(sid)
        if pool is None:
            return []
        short = waiting and (conn.short_of_slots(sid) or waited >= STUCK_S)
        if short and (asking or fan.outstanding.get(address)):
            conn.copy_out_waiting(sid)
        freed = pool.freed_count()
        late = waited >= WAIT_SLICE_S
        if freed and (asking or short or late or freed >= max(1, pool.slots // 2)):
            return pool.take_freed()
        return []

    def send_credit(self, stream_id: int, batches: int, consumed: int, freed: Sequence[int] = ()) -> None:
        fan = self._fan(stream_id)
        fan.allowed += batches
        fan.consumed = consumed
        fan.read = max(fan.read, consumed)
        self._pump(fan)

    def reseed(self, stream_id: int, from_seq: int, generation: int, rng: dict[str, Any]) -> None:
        fan = self._fan(stream_id)
        fan.reseeds.append((from_seq, generation, rng))
        fan.consumed = fan.read = from_seq
        if fan.end is not None and fan.end >= from_seq:
            fan.end = None  # replanned: the length is to be learnt again
        # What arrived from from_seq on is void. A live server makes again what it sent (it
        # remembers): those batches are outstanding again. A lost server's, and those of
        # streams on connections replaced since, go to the live servers.
        void: set[int] = set()
        for address, (conn, sid) in fan.streams.items():
            sent = conn.void_from(sid, from_seq, generation)
            if address in fan.outstanding:
                try:
                    conn.reseed(sid, from_seq, generation, rng)
                    fan.outstanding[address].update(sent)
                    continue
                except (ConnectionLost, ClientClosed):
                    pass  # lost: the next round hands what it was asked to the others
            void.update(sent)
        for conn, sid in fan.retired:
            void.update(conn.void_from(sid, from_seq, generation))
        if void:
            fan.requeue = collections.deque(sorted(void.union(fan.requeue)))

    def stream_end_state(self, stream_id: int) -> tuple[int, dict[str, Any] | None] | None:
        """The stream's length and the RNG state its plan ends at, once a server told them."""
        fan = self._fans.get(stream_id)
        if fan is None:
            return None
        for conn, sid in fan.streams.values():  # (a retired stream may predate a reseed)
            state = conn.stream_end_state(sid)
            if state is not None:
                return state
        return None

    @property
    def opens_ahead(self) -> bool:
        """Every server can have streams opened ahead of it (1.6; see :class:`Client`)."""
        return all(c.opens_ahead for c in self._conns.values())

    def close_ahead(self) -> None:
        """Close the streams opened ahead for loops' next epochs (see :class:`Client`)."""
        self.ahead.close_all(self.close_stream)

    def close_stream(self, stream_id: int) -> None:
        fan = self._fans.pop(stream_id, None)
        if fan is None:
            return
        for conn, sid in fan.every_stream():
            conn.close_stream(sid)

    # ------------------------------------------------------------------ lifecycle
    def info(self) -> dict[str, Any]:
        self._adopt_returned()
        return {
            "servers": {a: (a in self._conns and self._conns[a].alive()) for a in self.addresses},
            "batch_transport": {a: c.info()["batch_transport"] for a, c in self._conns.items()},
            "batches_copied_out": sum(
                c.info()["batches_copied_out"] for c in [*self._conns.values(), *self._retired]
            ),
            **self.ahead.info(),
        }

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return  # the parent's (its connections say so if used: ClientClosed)
        self.ahead.clear()
        with self._lock:
            self._stop.set()
        self._reconnector.join(0.5)  # a try in progress (DNS, handshake) ends on its own
        self._adopt_returned()
        for conn in [*self._conns.values(), *self._retired]:
            conn.close()

    def __enter__(self) -> FanoutClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
