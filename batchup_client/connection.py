"""The client's socket code: control DEALER, data PULL, heartbeat thread.

With CURVE keys (:class:`CurveClientKeys`) all three sockets are CURVE clients that know
the server's public key: the server proves it holds the matching secret key, and its ZAP
handler checks this client's public key. While waiting for the ``Welcome`` the client
watches its control socket's handshake events, so a refused key (or CURVE on one side
only) is an :class:`~batchup_client.errors.AuthenticationError` at once, not a hang.

This is the only client module that touches ZeroMQ sockets; every ``zmq.ZMQError`` is
turned into a :mod:`batchup_client.errors` exception here. Key files are read in
:mod:`batchup_client.keys`. Stream logic (reordering, RNG
parity, credits) lives in :mod:`batchup_client.streaming` and only calls the methods
below.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zmq

import batchup_protocol as proto
from batchup_protocol import ErrorCode
from batchup_protocol.host import content_key, host_id, make_private_dir, sweep_stale, tune_malloc

from .ahead import Ahead
from .errors import (
    AuthenticationError,
    BatchupError,
    BatchupTimeout,
    ClientClosed,
    ConnectionLost,
    DatasetNotReady,
    InvalidArgumentError,
    ProtocolViolation,
    RemoteError,
    UnknownSourceError,
    UnsupportedDtypeError,
    VersionMismatchError,
    remote_error,
)
from .keys import CurveClientKeys, handshake_failure
from .pickling import pickle_function
from .streaming import Inbox, SlotPool, admit_batch

__all__ = ["Client", "UPLOAD_CHUNK_BYTES", "wait_any"]

log = logging.getLogger("batchup_client")

UPLOAD_CHUNK_BYTES = 8 << 20
GOODBYE_LINGER_MS = 250
POLL_SLICE_MS = 100
STOP_DRAIN_MS = 50  #: after a "shutting down" notice, how long to wait for batches still on the way
NOT_READY_POLL_S = 0.5  #: how often to ask again for a dataset the server is fetching
NOT_READY_REPORT_S = 15.0  #: how often to say so in the log
#: handshakes that fail without detail (libzmq's view of a wrong server key, or of CURVE on
#: one side only) before the client gives up; a refused key or a mechanism mismatch is at once
HANDSHAKE_FAILURES = 2
#: batch credit asked of a server before protocol 1.5, which does not tell its limit: what
#: every client asked before 1.5
OLD_SERVER_CREDIT = 32

#: private folders of clients not yet torn down, with the process that made each. At exit,
#: those of clients still being made go too: a daemon thread (a fanned-out client
#: reconnecting to a server that stopped answering) is stopped mid-handshake, before it
#: could remove its folder. A forked child inherits the set, and leaves its parent's alone.
_live_dirs: dict[str, int] = {}


@atexit.register
def _remove_live_dirs() -> None:
    me = os.getpid()
    for path, pid in list(_live_dirs.items()):
        if pid == me:
            shutil.rmtree(path, ignore_errors=True)
            del _live_dirs[path]


#: clients not closed yet: at exit each says goodbye, so its server frees its streams and
#: pools at once instead of after client_timeout (registered after _remove_live_dirs: runs
#: first). Clients of several servers first: closed, they stop reconnecting their servers
_live_clients: weakref.WeakSet[Any] = weakref.WeakSet()
_live_fanouts: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _close_live_clients() -> None:
    for client in [*_live_fanouts, *_live_clients]:
        with contextlib.suppress(Exception):
            client.close()  # a forked child's copy closes nothing of its parent's


_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_CONNECTED  # what a handshake that never comes waited on: for the error
    | zmq.EVENT_CONNECT_RETRIED
)


def _curve_client(sock: zmq.Socket[Any], curve: CurveClientKeys) -> None:
    """Make ``sock`` a CURVE client of the server (before bind/connect)."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)


def _local_address_towards(host: str, port: int) -> str:
    """The local interface address the kernel would use to reach ``host``."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(infos[0][4])
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class _Heartbeat(threading.Thread):
    """Sends heartbeats on a socket of its own, so a busy training step never starves them."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        address: str,
        client_id: bytes,
        interval: float,
        timeout: float,
        curve: CurveClientKeys | None = None,
    ):
        super().__init__(name="batchup-heartbeat", daemon=True)
        self.ctx, self.address, self.client_id = ctx, address, client_id
        self.interval, self.timeout = interval, timeout
        self.curve = curve
        self.stopped = threading.Event()
        self.lost: str = ""
        self.mechanism = -1  #: the socket's security mechanism (zmq.CURVE or zmq.NULL), once made
        self.made = threading.Event()  #: set once the socket exists (and ``mechanism`` is known)

    def run(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.client_id + proto.HEARTBEAT_SUFFIX)
        if self.curve is not None:
            _curve_client(sock, self.curve)
        self.mechanism = sock.getsockopt(zmq.MECHANISM)  # type: ignore[assignment]
        self.made.set()
        try:
            sock.connect(self.address)
            last_ok = time.monotonic()
            while not self.stopped.is_set():
                sock.send_multipart(proto.encode(proto.Heartbeat(self.client_id, time.time())))
                deadline = time.monotonic() + self.interval
                while not self.stopped.is_set() and (remaining := deadline - time.monotonic()) > 0:
                    if not sock.poll(min(remaining, 0.1) * 1000):
                        continue
                    msg, _ = proto.decode(sock.recv_multipart(copy=False))
                    if isinstance(msg, proto.Heartbeat):
                        last_ok = time.monotonic()
                    elif isinstance(msg, proto.Error) and msg.code == ErrorCode.UNKNOWN_CLIENT:
                        self.lost = "the server no longer knows this client (it restarted, or reclaimed it)"
                if time.monotonic() - last_ok > self.timeout:
                    self.lost = f"the server stopped answering heartbeats for {self.timeout:g}s"
        except (zmq.ZMQError, proto.ProtocolError) as exc:
            if not self.stopped.is_set():
                self.lost = f"heartbeat failed: {exc}"
        finally:
            sock.close(linger=0)


class Client:
    """A connection to a ``batchup-server``: use :func:`batchup_client.connect` to make one.

    Holds a control DEALER socket, a data PULL socket it binds (the server and its
    workers connect to it) and a heartbeat thread. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 10.0,
        token: str = "",
        server_timeout: float | None = None,
        on_close: Callable[[], None] | None = None,
        share_memory: bool | None = None,
        curve: CurveClientKeys | None = None,
    ):
        if not isinstance(address, str) or address.split("://", 1)[0] not in ("tcp", "ipc"):
            raise ValueError(f"address should start with tcp:// or ipc://, got {address!r}")
        self.address = address
        self.timeout = timeout
        self.client_id = secrets.token_bytes(16)
        self.curve = curve  #: CURVE keys (None: plain ZeroMQ, for loopback/ipc servers)
        self._on_close = on_close
        self._closed = False
        self._stopping = ""  #: why the server is gone, when it said it is shutting down
        tune_malloc()
        self._request_id = 0
        self._inboxes: dict[int, Inbox] = {}
        self._replies: dict[int, tuple[Any, list[Any]]] = {}
        self._next_stream = 0
        #: batches and bytes a stream keeps in flight (batches capped by the server's limit)
        self.prefetch: tuple[int, int] = (128, 128 << 20)
        #: on the server's host, receive batches in shared-memory slots instead of frames
        self.shared_memory_batches = os.environ.get("BATCHUP_SHM_BATCHES", "1") != "0"
        #: next epochs' streams opened ahead (see :mod:`batchup_client.ahead`)
        self.ahead = Ahead()
        self._pools: dict[int, SlotPool] = {}  #: stream id → its pool (kept after the stream closes)
        self._pool_maps: dict[str, SlotPool] = {}  #: pool file → mapping, reused by later streams
        self._closed_streams: set[int] = set()  #: closed streams whose pool was unmapped
        self._copied_gone = 0  #: batches copied out of pools unmapped since
        #: content keys of arrays this server was given: a later batch_iterator() over the
        #: same arrays opens its stream without asking again (should the server have deleted
        #: one unused since, the request is answered UNKNOWN_SOURCE: see _arrays_again)
        self._held_keys: set[str] = set()
        self._sent_arrays: dict[str, weakref.ref[Any]] = {}  #: the arrays behind keys sent (weakly)
        self._stats = {
            "arrays_shared": 0,
            "arrays_uploaded": 0,
            "arrays_reused": 0,
            "bytes_shared": 0,
            "bytes_uploaded": 0,
            "streams_opened": 0,
            "streams_shared_memory": 0,
            "streams_socket": 0,
            "data_messages": 0,  #: ZeroMQ messages received on the data socket
            "bundled": 0,  #: messages that came in a bundle with others (protocol 1.3)
            "batches_copied_out": 0,
            "batches_made_again": 0,  #: batches recomputed after a server's worker died (1.4)
        }
        sweep_stale(tempfile.gettempdir(), "batchup-client-")
        self._pid = os.getpid()  #: the process whose sockets these are (a fork's child has none)
        self._private_dir = make_private_dir("batchup-client-")
        _live_dirs[self._private_dir] = self._pid
        self._ctx = zmq.Context()
        self._heartbeat: _Heartbeat | None = None
        try:
            self._control = self._ctx.socket(zmq.DEALER)
            self._control.setsockopt(zmq.LINGER, 0)
            self._control.setsockopt(zmq.ROUTING_ID, self.client_id)
            self._data = self._ctx.socket(zmq.PULL)
            self._data.setsockopt(zmq.LINGER, 0)
            if curve is not None:
                _curve_client(self._control, curve)
                # batches are accepted only from the holder of the server's key
                _curve_client(self._data, curve)
            self._monitor: zmq.Socket[Any] | None = self._control.get_monitor_socket(_HANDSHAKE_EVENTS)
            self._control.connect(address)
            self.data_endpoint = self._bind_data(address)
        except zmq.ZMQError as exc:
            self._teardown()
            raise ConnectionLost(f"cannot connect to {address!r}: {exc}") from exc
        try:
            welcome = self._handshake(token)
        except BaseException:
            self._teardown()
            raise
        self.server_id = welcome.server_id
        self.sources: list[str] = list(welcome.sources)
        self.trusts_code = bool(welcome.trusts_code)  #: the server runs functions shipped for map(fn)
        self.transforms: list[str] = list(welcome.transforms)  #: named transforms of its plugins
        self._code_keys: dict[int, tuple[Any, str]] = {}
        self.welcome = welcome
        _live_clients.add(self)
        #: the most batches the server lets a stream have in flight; a server before protocol
        #: 1.5 does not say (its limit is an option, 64 by default): ask for what clients did
        self.max_credit_batches = (
            max(1, int(welcome.max_credit_batches))
            if proto.tells_credit_limit(welcome.version)
            else OLD_SERVER_CREDIT
        )
        #: the server tells a plan's final RNG state and takes a start credit (1.6): streams
        #: can be opened ahead of it (a 1.5 server would make a whole window for nothing)
        self.opens_ahead = proto.opens_ahead(welcome.version)
        self.same_host = share_memory is not False and (
            welcome.host_id == host_id()
            and bool(welcome.shm_dir)
            and os.path.isdir(welcome.shm_dir)
            and os.access(welcome.shm_dir, os.W_OK)
        )
        self._heartbeat = _Heartbeat(
            self._ctx,
            address,
            self.client_id,
            welcome.heartbeat_interval,
            server_timeout or max(5.0, 5 * welcome.heartbeat_interval),
            curve,
        )
        self._heartbeat.start()
        log.info(
            "connected to %s (server %s); client arrays go by %s",
            address,
            self.server_id,
            "shared-memory file" if self.same_host else "chunked upload",
        )

    # ------------------------------------------------------------------ setup and teardown
    def _bind_data(self, address: str) -> str:
        scheme = address.split("://", 1)[0]
        if scheme == "ipc":
            endpoint = f"ipc://{self._private_dir}/data"
            self._data.bind(endpoint)
            return endpoint
        if scheme == "tcp":
            parsed = urllib.parse.urlsplit(address.replace("tcp://", "http://", 1))
            ip = _local_address_towards(parsed.hostname or "127.0.0.1", parsed.port or 5555)
            port = self._data.bind_to_random_port(f"tcp://{ip}")
            return f"tcp://{ip}:{port}"
        raise ConnectionLost(f"address should start with tcp:// or ipc://, got {address!r}")

    def _handshake(self, token: str) -> proto.Welcome:
        hello = proto.Hello(
            list(proto.PROTOCOL_VERSION), self.client_id, self.data_endpoint, host_id(), token, os.getpid()
        )
        deadline = time.monotonic() + self.timeout
        self._handshake_failures = 0
        self._connected = False  #: a connection was accepted (else every attempt failed)
        self._retries = 0  #: connection attempts that failed (refused, no such file, unreachable)
        try:
            frames = proto.encode(hello)
            while True:  # never block in send: with no peer (its handshake failed) it would hang
                try:
                    self._control.send_multipart(frames, zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:
                    self._watch_handshake(min(deadline, time.monotonic() + 0.1), writable=True)
                except zmq.ZMQError as exc:
                    raise ConnectionLost(f"cannot send to {self.address}: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise BatchupTimeout(f"could not send to {self.address}")
            if not self._watch_handshake(deadline):
                raise BatchupTimeout(f"no handshake with {self.address} within {self.timeout:g}s")
            reply, _ = self._wait_reply(0, max(0.0, deadline - time.monotonic()), heartbeat=False)
        except BatchupTimeout as exc:
            raise ConnectionLost(self._no_answer()) from exc
        except RemoteError as exc:
            if exc.code == ErrorCode.UNAVAILABLE:  # serving all the clients it may: try later
                raise ConnectionLost(f"the batchup-server at {self.address} refused: {exc.args[0]}") from exc
            raise
        finally:
            self._stop_monitor()
        if not isinstance(reply, proto.Welcome):
            raise ProtocolViolation(f"expected welcome, got {reply.TYPE}")
        if len(reply.version) != 2 or not proto.is_compatible((reply.version[0], reply.version[1])):
            raise VersionMismatchError(
                ErrorCode.VERSION_MISMATCH,
                f"protocol version mismatch: client speaks {proto.PROTOCOL_VERSION[0]}.x, "
                f"server answered {reply.version}",
            )
        return reply

    def _no_answer(self) -> str:
        """Why a handshake timed out, as far as the control socket's events tell."""
        within = f"within {self.timeout:g}s"
        if self._connected:
            return (
                f"a connection to {self.address} was accepted, but no batchup-server answered "
                f"{within}: is another program listening there, or is the server stuck?"
            )
        if self._retries:
            return (
                f"nothing accepted a connection at {self.address} ({self._retries + 1} attempts "
                f"{within} were refused or failed): is batchup-server running there, and are the "
                "address and port right?"
            )
        return (
            f"no batchup-server answered at {self.address} {within}; is it running, is the address "
            "right, and does a firewall let the connection through?"
        )

    def _watch_handshake(self, deadline: float, writable: bool = False) -> bool:
        """Wait until the control socket's security handshake succeeded (or a reply came, or,
        with ``writable``, a send would not block); False at ``deadline``. Raises
        :class:`AuthenticationError` when the handshake fails, instead of waiting for nothing."""
        assert self._monitor is not None
        from zmq.utils.monitor import recv_monitor_message

        poller = zmq.Poller()
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._control, zmq.POLLIN | (zmq.POLLOUT if writable else 0))
        while (left := deadline - time.monotonic()) > 0:
            try:
                ready = dict(poller.poll(int(min(left * 1000, POLL_SLICE_MS)) + 1))
                if self._control in ready:
                    return True  # an answer came (the handshake succeeded), or room to send
                if self._monitor not in ready:
                    continue
                event = recv_monitor_message(self._monitor)["event"]
            except zmq.ZMQError as exc:
                raise ConnectionLost(f"connection to {self.address} failed: {exc}") from exc
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
            if event == zmq.EVENT_CONNECTED:
                self._connected = True
                continue
            if event == zmq.EVENT_CONNECT_RETRIED:
                self._retries += 1
                continue
            self._handshake_failures += 1
            if (
                event != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                or self._handshake_failures >= HANDSHAKE_FAILURES
            ):
                raise AuthenticationError(handshake_failure(self.address, event, self.curve))
        return False

    def _stop_monitor(self) -> None:
        if self._monitor is None:
            return
        try:
            self._control.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._monitor = None

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stopped.set()
            self._heartbeat.join(2.0)

    def _teardown(self) -> None:
        self._stop_heartbeat()
        self._ctx.destroy(linger=0)
        shutil.rmtree(self._private_dir, ignore_errors=True)
        _live_dirs.pop(self._private_dir, None)

    def close(self) -> None:
        """Say goodbye, stop the heartbeat, close sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.forked():
            return  # the parent's client: its sockets, folder and server are not ours to touch
        self.ahead.clear()  # the server forgets them with the rest at the goodbye
        self._stop_heartbeat()  # no heartbeat may follow the goodbye
        try:
            self._control.send_multipart(proto.encode(proto.Goodbye(self.client_id)), zmq.NOBLOCK)
            self._control.close(linger=GOODBYE_LINGER_MS)  # let the goodbye out
        except zmq.ZMQError:
            pass
        self._teardown()
        if self._on_close is not None:
            self._on_close()

    def info(self) -> dict[str, Any]:
        """How this client talks to its server, and what it has sent so far."""
        return {
            **self._stats,
            "address": self.address,
            "server_id": self.server_id,
            "data_endpoint": self.data_endpoint,
            "transport": self.address.split("://", 1)[0],
            "array_transfer": "shared-memory file" if self.same_host else "chunked upload",
            "batch_transport": "shared memory"
            if self.same_host and self.shared_memory_batches
            else f"{self.address.split('://', 1)[0]} socket",
            "batches_copied_out": self._copied_gone + sum(p.copied for p in self._pool_maps.values()),
            "open_streams": len(self._inboxes),
            **self.ahead.info(),  # streams opened ahead for a loop's next epoch, and their fate
            "security": "CURVE" if self.curve is not None else "none",
        }

    def mechanisms(self) -> dict[str, int]:
        """Each socket's ZeroMQ security mechanism (``zmq.CURVE`` or ``zmq.NULL``)."""
        if self._heartbeat is not None:
            self._heartbeat.made.wait(5.0)  # its thread makes its socket
        return {
            "control": int(self._control.getsockopt(zmq.MECHANISM)),
            "data": int(self._data.getsockopt(zmq.MECHANISM)),
            "heartbeat": self._heartbeat.mechanism if self._heartbeat is not None else -1,
        }

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<batchup_client.Client {self.address} server={self.server_id} {state}>"

    # ------------------------------------------------------------------ plumbing
    def forked(self) -> bool:
        """Whether this is a forked child's copy of a client made by its parent."""
        return os.getpid() != self._pid

    def _check_process(self) -> None:
        if self.forked():
            raise ClientClosed(
                f"this client was made in process {self._pid}, which forked this one: ZeroMQ "
                "sockets do not survive a fork, so a forked process must connect() a client of "
                "its own (drop-in sources do that by themselves)"
            )

    def _check(self) -> None:
        self._check_process()
        if self._closed:
            raise ClientClosed("this client was closed")
        if self._stopping:
            raise ConnectionLost(self._stopping)
        if self._heartbeat is not None and self._heartbeat.lost:
            raise ConnectionLost(f"lost the server at {self.address}: {self._heartbeat.lost}")

    def _send(self, msg: Any, arrays: Sequence[Any] = ()) -> None:
        try:
            self._control.send_multipart(proto.encode(msg, arrays), copy=False)
        except zmq.ZMQError as exc:
            raise ConnectionLost(f"cannot send to {self.address}: {exc}") from exc

    def _decode(self, frames: list[Any]) -> tuple[Any, list[Any]]:
        try:
            return proto.decode(frames)
        except proto.ProtocolError as exc:
            raise ProtocolViolation(f"the server sent an invalid message: {exc}") from exc

    def _wait_reply(
        self, request_id: int, timeout: float | None, heartbeat: bool = True
    ) -> tuple[Any, list[Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if heartbeat:
                self._check()
            left_ms = POLL_SLICE_MS if deadline is None else (deadline - time.monotonic()) * 1000
            wait = int(max(0, min(POLL_SLICE_MS, left_ms)))
            try:
                ready = self._control.poll(wait)
                if not ready:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise BatchupTimeout(f"no answer from {self.address} within {timeout:g}s")
                    continue
                frames = self._control.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                raise ConnectionLost(f"connection to {self.address} failed: {exc}") from exc
            msg, arrays = self._decode(frames)
            if isinstance(msg, proto.Error) and msg.request_id in (request_id, 0):
                raise remote_error(msg.code, msg.message, msg.remote_type, msg.traceback)
            if getattr(msg, "request_id", 0) == request_id:
                return msg, arrays
            # a late answer to a request that timed out: drop it

    def request(
        self, msg_factory: Callable[[int], Any], arrays: Sequence[Any] = (), timeout: float | None = None
    ) -> tuple[Any, list[Any]]:
        """Send the request ``msg_factory(request_id)`` and wait for its answer."""
        self._check()
        self._request_id += 1
        rid = self._request_id
        self._send(msg_factory(rid), arrays)
        return self._wait_reply(rid, self.timeout if timeout is None else timeout)

    def _recv_data(self, timeout_ms: int) -> bool:
        """File one message from the data socket into its inbox; False if none arrived."""
        try:
            try:  # the common case under load: a message is already waiting
                frames = self._data.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if not self._data.poll(timeout_ms):
                    return False
                frames = self._data.recv_multipart(copy=False)
        except zmq.ZMQError as exc:
            raise ConnectionLost(f"data connection failed: {exc}") from exc
        try:
            items = proto.decode_bundle(frames)  # one message, or several back to back (1.3)
        except proto.ProtocolError as exc:
            raise ProtocolViolation(f"the server sent an invalid message: {exc}") from exc
        self._stats["data_messages"] += 1
        if len(items) > 1:
            self._stats["bundled"] += len(items)
        for msg, arrays in items:
            self._file(msg, arrays)
        return True

    def _file(self, msg: Any, arrays: list[Any]) -> None:
        """Put one data message where its reader looks for it."""
        if isinstance(msg, proto.Error) and msg.code == ErrorCode.SHUTTING_DOWN:
            # the server is going: lost as if it stopped answering (batches that came stay
            # readable; a fanned-out stream asks the other servers), not a stream's failure
            self._stopping = f"the server at {self.address} is shutting down"
            return
        if isinstance(msg, proto.GatherResult) or (isinstance(msg, proto.Error) and msg.stream_id == 0):
            self._replies[msg.request_id] = (msg, arrays)
            return
        stream_id = getattr(msg, "stream_id", None)
        inbox = self._inboxes.get(stream_id) if isinstance(stream_id, int) else None
        if isinstance(msg, proto.Batch):
            if msg.supersedes >= 0:
                self._stats["batches_made_again"] += 1
            pool = self._pools.get(msg.stream_id)
            try:
                if not admit_batch(msg, inbox, pool, msg.stream_id in self._closed_streams):
                    return
                if msg.slot >= 0:
                    assert pool is not None
                    arrays = pool.arrays(msg.slot, msg.layout)  # dropped views free the slot
            except proto.ProtocolError as exc:
                raise ProtocolViolation(f"the server sent an invalid slot batch: {exc}") from exc
        if inbox is not None:
            inbox.put(msg, arrays)

    # ------------------------------------------------------------------ streams
    def open_stream(
        self,
        source: dict[str, Any],
        plan: dict[str, Any],
        plan_arrays: Sequence[Any],
        batch_size: int,
        include_indices: bool,
        fields: list[str] | None,
        credit_batches: int,
        credit_bytes: int,
        transforms: list[dict[str, Any]] | None = None,
        transform_seed: int = 0,
        assigned: bool = False,
        start_credit: int = -1,
    ) -> int:
        """Open a stream; returns its id. Batches then arrive through :meth:`next_item`.
        ``assigned``: the server makes only the batches :meth:`assign` names;
        ``start_credit``: of ``credit_batches``, the batches it may make before the first
        :meth:`send_credit` (-1: all; a stream opened ahead)."""

        def once() -> int:  # (again, should the server have deleted the source's arrays)
            self._next_stream += 1
            sid = self._next_stream
            self._inboxes[sid] = Inbox()
            shm = self.same_host and self.shared_memory_batches
            try:
                reply, _ = self.request(
                    lambda rid: proto.OpenStream(
                        rid,
                        sid,
                        source,
                        plan,
                        batch_size,
                        include_indices,
                        credit_batches,
                        credit_bytes,
                        fields,
                        shm,
                        list(transforms or []),
                        transform_seed,
                        assigned,
                        start_credit,
                    ),
                    plan_arrays,
                )
                if reply.pool_path:
                    self._forget_removed_pools()
                    pool = self._pool_maps.get(reply.pool_path)
                    if pool is None or (pool.slots, pool.slot_bytes) != (reply.slots, reply.slot_bytes):
                        pool = SlotPool(reply.pool_path, reply.slots, reply.slot_bytes)
                        self._pool_maps[reply.pool_path] = pool
                    self._pools[sid] = pool
            except BaseException:
                self.close_stream(sid)
                raise
            self._stats["streams_opened"] += 1
            self._stats["streams_shared_memory" if sid in self._pools else "streams_socket"] += 1
            return sid

        return self._arrays_again(source, once)  # type: ignore[no-any-return]

    def _forget_removed_pools(self) -> None:
        """Unmap the pools the server removed (it keeps a few idle ones per client and
        deletes older ones; a removed pool is never used again): each mapping goes once
        the batches the user still holds in it are gone."""
        used = {id(p) for sid, p in self._pools.items() if sid in self._inboxes}
        gone = {path for path, p in self._pool_maps.items() if id(p) not in used and not os.path.exists(path)}
        if not gone:
            return
        for path in gone:
            self._copied_gone += self._pool_maps.pop(path).copied
        for sid in [sid for sid, p in self._pools.items() if p.path in gone]:
            del self._pools[sid]
            self._closed_streams.add(sid)

    def pool(self, stream_id: int) -> SlotPool | None:
        """The stream's shared-memory slots, or ``None`` when its batches come as frames."""
        return self._pools.get(stream_id) if stream_id in self._inboxes else None

    def next_item(self, stream_id: int, seq: int) -> tuple[Any, list[Any]]:
        """Wait for item ``seq`` of a stream (a Batch, an EndOfStream or an Error)."""
        self._check_process()  # batches that came stay readable after a loss (fanned out)
        if self._closed:  # but not after close(): its pools are unmapped
            raise ClientClosed("this client was closed")
        inbox = self._inboxes.get(stream_id)
        if inbox is None:
            raise ClientClosed(f"stream {stream_id} is closed")
        waited = False  # a wait of a whole poll slice went by without a message
        drained = False  # a stopping server's last batches were waited for
        while True:
            item = inbox.take(seq)
            if item is not None:
                msg = item[0]
                if isinstance(msg, proto.Batch) and msg.supersedes >= 0:
                    pool = self._pools.get(stream_id)
                    if pool is not None:  # its first making has not come: that slot is free
                        pool.free_superseded(stream_id, msg.seq, msg.supersedes)
                return item
            if self._stopping and not drained:  # its notice may overtake batches its workers sent
                drained = True
                while self._recv_data(STOP_DRAIN_MS):
                    pass
                continue
            self._check()
            if not self._recv_data(0):  # nothing waiting: look for stream errors, then wait
                self._drain_control()
                if waited or self.short_of_slots(stream_id):
                    self._return_freed(stream_id, seq)
                waited = not self._recv_data(POLL_SLICE_MS)

    def short_of_slots(self, stream_id: int) -> bool:
        """Whether the server may lack a free slot for the stream: fewer than two of its
        pool's slots are not held here (by the user, waiting in the inbox, or freed and not
        yet reported), so fewer than two can be in flight."""
        pool = self._pools.get(stream_id)
        inbox = self._inboxes.get(stream_id)
        if pool is None or inbox is None:
            return False
        return pool.slots - pool.handed - len(inbox) - pool.freed_count() < 2

    def copy_out_waiting(self, stream_id: int) -> int:
        """Copy the stream's batches that arrived ahead of their turn out of their slots
        (several servers: the batch awaited may be another server's, or one this server
        cannot make until it has a free slot); returns how many were copied."""
        inbox = self._inboxes.get(stream_id)
        pool = self._pools.get(stream_id)
        if inbox is None or pool is None:
            return 0
        copied = inbox.copy_out()
        pool.copied += copied
        return copied

    def _return_freed(self, stream_id: int, consumed: int) -> None:
        """Hand back the stream's slots freed since its reader last reported (the user's
        dropped batches, or late batches of a closed stream that shared the pool); kept,
        the server could have no slot left to fill. Done before a wait when the server may
        be short of slots, and after any wait in vain (so a miscount costs one poll slice,
        never a hang)."""
        pool = self._pools.get(stream_id)
        freed = pool.take_freed() if pool is not None else []
        if freed:
            self.send_credit(stream_id, len(freed), consumed, freed)

    def _drain_control(self) -> None:
        """While streaming, errors about streams (a refused Credit...) come on the control socket."""
        try:
            while self._control.poll(0):
                msg, arrays = self._decode(self._control.recv_multipart(copy=False))
                if not isinstance(msg, proto.Error):
                    continue  # a late answer to a request that timed out
                if msg.code == ErrorCode.UNKNOWN_CLIENT:  # a restarted server: this session is gone
                    why = "the server no longer knows this client (it restarted, or reclaimed it)"
                    if self._heartbeat is None:
                        raise ConnectionLost(f"lost the server at {self.address}: {why}")
                    self._heartbeat.lost = why  # alive() is False from now on; _check() raises
                    continue
                inbox = self._inboxes.get(msg.stream_id)
                if inbox is not None:
                    inbox.put(dataclasses.replace(msg, seq=-1), arrays)
                elif msg.request_id == 0:
                    raise remote_error(msg.code, msg.message, msg.remote_type, msg.traceback)
        except zmq.ZMQError as exc:
            raise ConnectionLost(f"connection to {self.address} failed: {exc}") from exc

    def stream_end(self, stream_id: int) -> int | None:
        """The stream's length in batches, once the server said so (an EndOfStream)."""
        inbox = self._inboxes.get(stream_id)
        return None if inbox is None else inbox.end

    def stream_end_state(self, stream_id: int) -> tuple[int, dict[str, Any] | None] | None:
        """The stream's length and the RNG state its plan ends at (1.6; ``None`` from an
        older server or for a plan without an RNG), once the server told them."""
        inbox = self._inboxes.get(stream_id)
        if inbox is None or inbox.end is None:
            return None
        return inbox.end, inbox.final_rng

    def holds(self, stream_id: int, seq: int) -> bool:
        """Whether item ``seq`` of a stream arrived (a stream failure does not count)."""
        inbox = self._inboxes.get(stream_id)
        return inbox is not None and inbox.holds(seq)

    def ready(self, stream_id: int, seq: int) -> bool:
        """Whether item ``seq`` of a stream can be had without waiting."""
        inbox = self._inboxes.get(stream_id)
        return inbox is not None and inbox.has(seq)

    def poll_data(self, timeout: float) -> bool:
        """Receive one pending data message (waiting up to ``timeout`` s); False if none came."""
        self._check()
        return self._recv_data(int(timeout * 1000))

    def buffered(self, stream_id: int) -> int:
        """Batches of a stream received but not yet consumed (bounded by its credit)."""
        inbox = self._inboxes.get(stream_id)
        return 0 if inbox is None else len(inbox)

    def send_credit(self, stream_id: int, batches: int, consumed: int, freed: Sequence[int] = ()) -> None:
        if self._stopping and not self._closed and os.getpid() == self._pid:
            return  # the server is going: batches that came stay readable, then next_item says so
        self._check()
        self._send(proto.Credit(stream_id, batches, consumed, list(freed)))

    def assign(self, stream_id: int, seqs: list[int], consumed: int, freed: Sequence[int] = ()) -> None:
        """Ask for batches ``seqs`` of an assigned stream (each one more credit), handing back
        the shared-memory slots ``freed``."""
        self._check()
        self._send(proto.Credit(stream_id, len(seqs), consumed, list(freed), list(seqs)))

    def alive(self) -> bool:
        """Open, and the server still answers heartbeats."""
        try:
            self._check()
        except BatchupError:
            return False
        return True

    def reseed(self, stream_id: int, from_seq: int, generation: int, rng: dict[str, Any]) -> None:
        self._check()
        inbox = self._inboxes[stream_id]
        inbox.reset(generation, from_seq)
        self._send(proto.Reseed(stream_id, from_seq, generation, rng))

    def pass_to(self, stream_id: int, seq: int) -> None:
        """Items of a stream before ``seq`` were handed out, some from another server's
        stream (fanned out): none is needed from here any more (see :meth:`Inbox.pass_to`)."""
        inbox = self._inboxes.get(stream_id)
        if inbox is None:
            return
        pool = self._pools.get(stream_id)
        for passed, slot in inbox.pass_to(seq):  # made again; their first making never came
            if pool is not None:
                pool.free_superseded(stream_id, passed, slot)

    def void_from(self, stream_id: int, from_seq: int, generation: int) -> list[int]:
        """What :meth:`reseed` does here, without telling the server (a lost one, say):
        items of the stream from ``from_seq`` on are void; returns those that had arrived."""
        inbox = self._inboxes.get(stream_id)
        return [] if inbox is None else inbox.reset(generation, from_seq)

    def close_ahead(self) -> None:
        """Close the streams opened ahead for loops' next epochs (after the last epoch, say,
        to stop the server making batches nobody will read)."""
        self.ahead.close_all(self.close_stream)

    def close_stream(self, stream_id: int) -> None:
        """Release a stream's credits and buffers at once. Idempotent; quiet after close."""
        if self._inboxes.pop(stream_id, None) is None or self._closed or self.forked():
            return  # (a forked child's generator finalized: the socket is the parent's)
        try:
            self._control.send_multipart(proto.encode(proto.CloseStream(stream_id)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------------ one-off requests
    def register_code(self, fn: Any) -> str:
        """Ship ``fn`` (pickled with cloudpickle) to the server once; its key for transforms.

        Functions of ``__main__`` travel by value (cloudpickle's rule); so do functions of
        modules outside site-packages (a training script's own helper modules), which the
        server could not import. Raises :class:`~batchup_client.errors.UnauthorizedError`
        when the server does not trust client code.
        """
        known = self._code_keys.get(id(fn))
        if known is not None and known[0] is fn:
            return known[1]
        payload = pickle_function(fn)
        key = "sha256:" + hashlib.sha256(payload).hexdigest()
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        self.request(
            lambda rid: proto.RegisterCode(rid, key, name),
            [np.frombuffer(payload, dtype=np.uint8)],
            timeout=max(self.timeout, 60.0),
        )
        self._code_keys[id(fn)] = (fn, key)
        return key

    def describe(self, source: dict[str, Any], wait: float | None = None) -> proto.SourceInfo:
        """Length, fields and metadata of a source. A standard dataset the server is still
        fetching is waited for (up to ``wait`` seconds; ``None``: as long as it takes)."""
        return self._arrays_again(source, lambda: self._describe(source, wait))  # type: ignore[no-any-return]

    def _describe(self, source: dict[str, Any], wait: float | None) -> proto.SourceInfo:
        deadline = None if wait is None else time.monotonic() + wait
        told = 0.0
        while True:
            try:
                reply, _ = self.request(lambda rid: proto.Describe(rid, source))
                return reply  # type: ignore[no-any-return]
            except DatasetNotReady as exc:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise BatchupTimeout(f"{exc} (gave up after waiting {wait:g}s)") from exc
                if now - told >= NOT_READY_REPORT_S:
                    log.warning("waiting: %s", exc)
                    told = now
                time.sleep(NOT_READY_POLL_S if deadline is None else min(NOT_READY_POLL_S, deadline - now))

    def gather(
        self, source: dict[str, Any], indices: np.ndarray[Any, Any], fields: list[str] | None
    ) -> list[Any]:
        """Rows ``indices`` (absolute) of each field of a source."""
        return self._arrays_again(source, lambda: self._gather(source, indices, fields))  # type: ignore[no-any-return]

    def _gather(
        self, source: dict[str, Any], indices: np.ndarray[Any, Any], fields: list[str] | None
    ) -> list[Any]:
        self._check()
        self._request_id += 1
        rid = self._request_id
        self._send(proto.Gather(rid, source, fields), [np.asarray(indices)])
        # the answer to a gather comes from a worker, on the data socket
        deadline = time.monotonic() + max(self.timeout, 60.0)
        while rid not in self._replies:
            self._check()
            try:
                if self._control.poll(0):
                    msg, _ = self._decode(self._control.recv_multipart(copy=False))
                    if isinstance(msg, proto.Error) and msg.request_id in (rid, 0):
                        raise remote_error(msg.code, msg.message, msg.remote_type, msg.traceback)
            except zmq.ZMQError as exc:
                raise ConnectionLost(str(exc)) from exc
            if not self._recv_data(POLL_SLICE_MS) and time.monotonic() > deadline:
                raise BatchupTimeout(f"no answer to gather from {self.address}")
        msg, arrays = self._replies.pop(rid)
        if isinstance(msg, proto.Error):
            raise remote_error(msg.code, msg.message, msg.remote_type, msg.traceback)
        return arrays

    def ensure_arrays(
        self, arrays: Sequence[np.ndarray[Any, Any]], keys: Sequence[str] | None = None
    ) -> list[str]:
        """Make sure the server holds these arrays; returns their content keys.

        Arrays the server already has (same content) are not sent again. On the same
        host they are written once into the server's shared-memory folder; otherwise
        they are uploaded in chunks over the control socket.
        """
        wire = None
        if keys is None:
            wire = _wire_arrays(arrays)
            keys = [content_key(a) for a in wire]
        keys = list(keys)
        if len(self._sent_arrays) > 256:  # (in place: a fanned-out client's are shared)
            for k in [k for k, r in self._sent_arrays.items() if r() is None]:
                del self._sent_arrays[k]
        for arr, key in zip(arrays, keys):  # to send again if the server deletes it unused
            with contextlib.suppress(TypeError):  # (an array-like without weak references)
                self._sent_arrays[key] = weakref.ref(arr)
        if self._held_keys.issuperset(keys):
            # given already, checked then (a key names dtype and shape): no request, and no
            # contiguous copy of an array that is not (one deleted since is sent again)
            self._stats["arrays_reused"] += len(keys)
            return keys
        if wire is None:
            wire = _wire_arrays(arrays)
        reply, _ = self.request(lambda rid: proto.HaveArrays(rid, list(keys)))
        for arr, key, present in zip(wire, keys, reply.present):
            if present:
                self._stats["arrays_reused"] += 1
            elif self.same_host:
                self._share(arr, key)
            else:
                self._upload(arr, key)
            self._held_keys.add(key)
        return keys

    def _arrays_again(self, source: dict[str, Any], call: Callable[[], Any]) -> Any:
        """``call()``; once more after sending the source's arrays again when the server
        answers that it does not have them (it deletes arrays no stream uses beyond its
        ``idle_array_bytes``)."""
        try:
            return call()
        except UnknownSourceError:
            keys = _array_keys(source)
            if not keys:
                raise
            reply, _ = self.request(lambda rid: proto.HaveArrays(rid, keys))
            missing = [k for k, present in zip(keys, reply.present) if not present]
            arrays = [self._sent_arrays[k]() if k in self._sent_arrays else None for k in missing]
            if not missing or any(a is None for a in arrays):
                raise  # not for want of arrays, or of arrays this process no longer has
            for arr, key in zip(arrays, missing):
                if content_key(np.ascontiguousarray(arr)) != key:
                    raise ValueError(
                        f"array {keys.index(key)} changed since it was handed to {self.address}, which "
                        "has since deleted it (unused): a source of arrays sends them once; make the "
                        "source anew"
                    ) from None
            log.info("%s deleted %d unused array(s) of ours: sending them again", self.address, len(missing))
            self._held_keys.difference_update(missing)
            self.ensure_arrays(arrays, missing)  # type: ignore[arg-type]
        return call()

    def _share(self, arr: np.ndarray[Any, Any], key: str) -> None:
        name = key.replace(":", "-") + ".npy"
        path = os.path.join(self.welcome.shm_dir, name)
        tmp = path[: -len(".npy")] + f".{os.getpid()}.tmp.npy"  # the server's sweep knows the pid
        try:
            np.save(tmp, arr, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:  # Ctrl-C mid-write, a full /dev/shm: no partial file left
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # the server hashes the file before it answers (about 1.5 GB/s, beside its other work)
        self.request(
            lambda rid: proto.RegisterArray(rid, key, path), timeout=max(self.timeout, arr.nbytes / 2e8)
        )
        self._stats["arrays_shared"] += 1
        self._stats["bytes_shared"] += arr.nbytes

    def _upload(self, arr: np.ndarray[Any, Any], key: str) -> None:
        flat = arr.reshape(-1).view(np.uint8)
        total = flat.nbytes
        step = max(1, min(UPLOAD_CHUNK_BYTES, self.welcome.max_message_bytes // 2))
        offset = 0
        while True:
            chunk = flat[offset : offset + step]
            message = functools.partial(
                proto.UploadChunk, key=key, dtype=arr.dtype.str, shape=list(arr.shape), offset=offset
            )
            self.request(message, [chunk], timeout=max(self.timeout, 60.0))
            offset += chunk.nbytes
            if offset >= total:
                self._stats["arrays_uploaded"] += 1
                self._stats["bytes_uploaded"] += total
                return


def _array_keys(source: dict[str, Any]) -> list[str]:
    """The content keys of client arrays a source reference names (composites: its children's)."""
    keys = list(source.get("arrays") or [])
    for child in source.get("composite") or []:
        keys += _array_keys(child.get("source") or {})
    return list(dict.fromkeys(keys))


def _wire_arrays(arrays: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
    """The arrays C-contiguous, each checked to be one a server takes."""
    wire = [np.ascontiguousarray(a) for a in arrays]
    for i, a in enumerate(wire):
        try:
            proto.check_dtype(a.dtype)
        except proto.UnsupportedDtype as exc:
            raise UnsupportedDtypeError(ErrorCode.UNSUPPORTED_DTYPE, f"array {i}: {exc}") from exc
        if a.ndim == 0:
            raise InvalidArgumentError(ErrorCode.INVALID_ARGUMENT, f"array {i} is 0-dimensional")
    return wire


def wait_any(clients: Sequence[Client], timeout: float) -> None:
    """Wait up to ``timeout`` s until one of ``clients`` has data, and file what came into
    the streams' inboxes (raising nothing: a client whose server died is left for its
    owner to notice through :meth:`Client.alive`)."""
    poller = zmq.Poller()
    live = [c for c in clients if not c.closed]
    for c in live:
        poller.register(c._data, zmq.POLLIN)
        poller.register(c._control, zmq.POLLIN)
    try:
        ready = dict(poller.poll(int(timeout * 1000)))
    except zmq.ZMQError:
        return
    for c in live:
        try:
            if c._data in ready:
                while c._recv_data(0):
                    pass
            if c._control in ready:
                c._drain_control()
        except BatchupError:
            continue  # noticed through alive()
