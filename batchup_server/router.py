"""The server's socket code: the control ROUTER, the worker pipes and the data PUSHes.

Everything else on the server is pure logic: streams and credit (``streams``), plans,
what a request may read (``catalog``), the functions a stream may apply (``functions``),
task sizes and bundles (``scheduling``), the records kept per client, stream and worker
(``state``), and config. This module turns messages into calls on it and sends what
comes out. ``zmq.ZMQError``
never leaves this module.

Sockets (PROTOCOL.md, "Sockets"):

* control ROUTER bound at ``--bind``: Hello/Welcome, OpenStream, Credit, Reseed,
  CloseStream, Describe, Gather, uploads, Heartbeat (from the client's heartbeat socket).
* one PUSH per worker (ipc, bound here) carrying tasks; one PULL (ipc) for their results.
* one PUSH per client, connected to the PULL the client bound; workers connect their
  own PUSH to it, so batches go straight from worker to client.

With CURVE keys (``--curve-secret-key``, ``--curve-clients``) the control ROUTER and every
data PUSH (the router's and the workers') are CURVE servers, and a ZAP handler
(pyzmq's ThreadAuthenticator) in the router process and in each worker process admits
only the client public keys in the clients folder. The client's data PULL is a CURVE
client holding the server's public key, so it accepts batches only from this server.
The worker pipes (ipc, private folder) stay plain.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import zmq

import batchup_protocol as proto
from batchup_protocol import ErrorCode
from batchup_protocol.host import tune_malloc
from batchup_protocol.plan import CountingRNG, build_plan, check_batch_size

from .catalog import SourceCatalog, in_range
from .config import ZMQ_MAX_SOCKETS
from .datasets.service import DatasetService
from .datasets.store import DatasetStore
from .errors import RequestError
from .functions import FunctionTable
from .plugins import load_plugins
from .scheduling import (
    COSTS_KEPT,
    IDLE_POOLS,
    MIN_SLOTS,
    WORKER_DEPTH,
    bundle_hold,
    cost_key,
    group_size,
)
from .security import CurveKeys
from .sources import SourceSpec
from .state import ClientState, Job, Pool, StreamEntry, WorkerHandle
from .streams import CreditWindow, End, Stream, StreamError, Task
from .uploads import Uploads, check_key
from .worker import TaskRunner

__all__ = ["Router", "worker_main"]

log = logging.getLogger("batchup_server")

POLL_MS = 100
AUTH_LOG_EVERY_S = 10.0  #: at most one log line per kind of refused handshake this often


class Router:
    """The server's main loop. Owns every server-side socket; see module docstring."""

    def __init__(
        self,
        config: Any,
        sources: dict[str, SourceSpec],
        runtime_dir: str,
        shm_dir: str,
        server_id: str,
        host: str,
        spawn_worker: Callable[[int, str, str], Any],
        curve: CurveKeys | None = None,
    ):
        self.config = config
        self.curve = curve
        self._auth_logged: dict[str, tuple[float, int]] = {}
        self.server_id = server_id
        self.host = host
        self.shm_dir = shm_dir
        self.ctx = zmq.Context()
        #: registered files hashed by threads: (routing id, request id, key, path, Error or None)
        self._verifications: queue.SimpleQueue[tuple[bytes, int, str, str, Any]] = queue.SimpleQueue()
        self.ctx.set(zmq.MAX_SOCKETS, ZMQ_MAX_SOCKETS)  # a socket per client (1023 by default)
        registry = load_plugins(config.plugins)  # before plugin sources are described
        self.functions = FunctionTable(registry, config.trust_client_code, config.bind, curve is not None)
        self.uploads = Uploads(shm_dir, config.max_upload_bytes)
        self.catalog = SourceCatalog(
            sources,
            self.uploads,
            DatasetService(DatasetStore(config.datasets), runtime_dir, config.datasets.download),
        )
        self.clients: dict[bytes, ClientState] = {}
        self.stopping = False
        self._spawn = spawn_worker
        self._tasks = 0
        self._rr: collections.deque[StreamEntry] = collections.deque()
        self._gathers: collections.deque[tuple[Any, ...]] = collections.deque()
        self._retry: collections.deque[tuple[Job, Task]] = collections.deque()
        self._pools_made = 0
        self._verifying: collections.Counter[str] = collections.Counter()  #: files being hashed
        #: worker messages that found a worker's queue full, sent again on the next round
        self._unsent: list[tuple[WorkerHandle, bytes]] = []
        self._limits = proto.Limits(max_array_bytes=config.max_message_bytes)
        self.auth: Authenticator | None = None
        try:
            if curve is not None:
                self.auth = start_authenticator(self.ctx, curve)
            self.control = self._socket(zmq.ROUTER, client_facing=True)
            self.control.setsockopt(zmq.ROUTER_MANDATORY, 0)
            self.control.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes + (1 << 20))
            self.control.bind(config.bind)
            self.endpoint = self.control.getsockopt_string(zmq.LAST_ENDPOINT)
            self.health: zmq.Socket[Any] | None = None
            self.health_endpoint = ""
            if config.health_bind:  # never CURVE: loopback or ipc only (checked by the config)
                self.health = self._socket(zmq.ROUTER)
                self.health.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
                self.health.bind(config.health_bind)
                self.health_endpoint = self.health.getsockopt_string(zmq.LAST_ENDPOINT)
            self.results = self._socket(zmq.PULL)
            results_endpoint = f"ipc://{runtime_dir}/results"
            self.results.bind(results_endpoint)
            self.workers: list[WorkerHandle] = []
            for i in range(config.workers):
                endpoint = f"ipc://{runtime_dir}/worker-{i}"
                sock = self._socket(zmq.PUSH)
                sock.bind(endpoint)
                proc = spawn_worker(i, endpoint, results_endpoint)
                self.workers.append(WorkerHandle(i, endpoint, sock, proc))
            self._results_endpoint = results_endpoint
            self.monitor = self.control.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            )
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"cannot bind {config.bind}: {exc}") from exc

    # ------------------------------------------------------------------ setup
    def _socket(self, kind: int, client_facing: bool = False) -> zmq.Socket[Any]:
        """A socket with LINGER 0; a CURVE server when it talks to clients and keys are set."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if client_facing and self.curve is not None:
            make_curve_server(sock, self.curve)
        return sock

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        if self.health is not None:
            poller.register(self.health, zmq.POLLIN)
        next_check = 0.0
        while not self.stopping:
            try:
                events = dict(poller.poll(POLL_MS))
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if self.control in events:
                self._drain(self.control, self._on_control)
            if self.results in events:
                self._drain(self.results, self._on_result)
            if self.monitor in events:
                self._on_monitor()
            if self.health is not None and self.health in events:
                self._drain(self.health, self._on_health)
            self._verified()
            now = time.monotonic()
            if now >= next_check:
                next_check = now + min(0.5, self.config.heartbeat_interval)
                self._check_workers()
                self._refresh_keys()
                self._reap_clients(now)
                self._evict_idle()
                self._send_unsent()
                if self.config.parent_pid and not _alive(self.config.parent_pid):
                    log.info("parent process %d is gone; shutting down", self.config.parent_pid)
                    self.stopping = True
            self._schedule()

    def _drain(self, sock: zmq.Socket[Any], handler: Callable[[list[Any]], None]) -> None:
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handler(frames)

    def _on_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        try:
            event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
        except zmq.Again:
            return
        kind, value = event.get("event"), event.get("value", 0)
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            assert self.curve is not None
            self._log_refusal(
                "auth",
                f"refused a client whose CURVE public key is not in {self.curve.clients_dir} (ZAP status "
                f"{value}); add its NAME.key there to serve it",
            )
        elif (
            kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        ):
            self._log_refusal(
                "mechanism",
                "refused a client without CURVE keys (this server requires them)"
                if self.curve is not None
                else "refused a client that uses CURVE keys (this server has none; drop the client's keys "
                "or start the server with --curve-secret-key and --curve-clients)",
            )
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            self._log_refusal(
                "crypto", "a client's CURVE handshake failed: its server key is not this server's public key"
            )
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            log.warning("rejected a connection that does not speak ZMTP (from %s)", event.get("endpoint"))
        else:  # a peer that went away mid-handshake (e.g. a client closed right after connecting)
            log.debug("a connection closed during its handshake (from %s)", event.get("endpoint"))

    def _log_refusal(self, kind: str, text: str) -> None:
        """Log a refused handshake, at most once per AUTH_LOG_EVERY_S per kind (a refused
        peer that keeps reconnecting would otherwise fill the log)."""
        now = time.monotonic()
        last, suppressed = self._auth_logged.get(kind, (-AUTH_LOG_EVERY_S, 0))
        if now - last < AUTH_LOG_EVERY_S:
            self._auth_logged[kind] = (last, suppressed + 1)
            return
        more = f" (and {suppressed} more like it in the last {now - last:.0f}s)" if suppressed else ""
        log.warning("%s%s", text, more)
        self._auth_logged[kind] = (now, 0)

    # ------------------------------------------------------------------ control messages
    def _on_control(self, frames: list[Any]) -> None:
        routing_id, body = frames[0].bytes, frames[1:]
        try:
            msg, arrays = proto.decode(body, self._limits)
        except Exception as exc:  # whatever the bytes, the server keeps serving
            code = ErrorCode.MALFORMED
            if isinstance(exc, proto.UnsupportedDtype):
                code = ErrorCode.UNSUPPORTED_DTYPE
            elif isinstance(exc, proto.FrameTooLarge):
                code = ErrorCode.TOO_LARGE
            log.warning("malformed request from %s: %s", routing_id.hex()[:16], exc)
            self._reply(routing_id, proto.Error(code, f"malformed request: {exc}"))
            return
        request_id = getattr(msg, "request_id", 0)
        try:
            self._dispatch(routing_id, msg, arrays)
        except (RequestError, StreamError, proto.ProtocolError) as exc:
            code = getattr(exc, "code", None)
            if code is None:
                code = (
                    ErrorCode.MALFORMED
                    if isinstance(exc, proto.ProtocolError)
                    else ErrorCode.INVALID_ARGUMENT
                )
            level = logging.DEBUG if code == ErrorCode.NOT_READY else logging.WARNING
            log.log(level, "request %s from %s failed: %s", msg.TYPE, routing_id.hex()[:8], exc)
            self._reply(routing_id, proto.Error(code, str(exc), request_id, getattr(msg, "stream_id", 0)))
        except Exception as exc:  # a bug: report it, keep serving everyone else
            log.exception("internal error handling %s", msg.TYPE)
            self._reply(
                routing_id,
                proto.Error(
                    ErrorCode.INTERNAL,
                    f"internal server error: {exc!r}",
                    request_id,
                    getattr(msg, "stream_id", 0),
                    -1,
                    type(exc).__name__,
                    traceback.format_exc(),
                ),
            )

    def _verify_file(self, routing_id: bytes, request_id: int, key: str, real: str) -> None:
        """A verification thread: hash a registered file; the loop answers (:meth:`_verified`)."""
        error: Any = None
        try:
            self.uploads.verify_file(key, real)
        except RequestError as exc:
            error = proto.Error(exc.code, str(exc), request_id)
        except Exception as exc:  # a disk error, say
            error = proto.Error(ErrorCode.INTERNAL, f"cannot read {real}: {exc!r}", request_id)
        self._verifications.put((routing_id, request_id, key, real, error))

    def _verified(self) -> None:
        """Answer the registrations whose files were hashed since the last round."""
        while True:
            try:
                routing_id, request_id, key, real, error = self._verifications.get_nowait()
            except queue.Empty:
                return
            self._verifying[real] -= 1
            if not self._verifying[real]:
                del self._verifying[real]
            if error is not None:
                log.warning("request register_array from %s failed: %s", routing_id.hex()[:8], error.message)
                self._reply(routing_id, error)
            elif routing_id in self.clients:
                self.uploads.adopt(key, real)
                self._reply(routing_id, proto.Ack(request_id))

    def _reply(self, routing_id: bytes, msg: Any, arrays: list[Any] | tuple[Any, ...] = ()) -> None:
        try:
            self.control.send_multipart([routing_id, *proto.encode(msg, arrays)], copy=False)
        except zmq.ZMQError as exc:
            log.warning("cannot reply to %s: %s", routing_id.hex()[:8], exc)

    def _client(self, routing_id: bytes) -> ClientState:
        client = self.clients.get(routing_id)
        if client is None:
            raise RequestError(
                ErrorCode.UNKNOWN_CLIENT,
                "unknown client: send hello first (or the server reclaimed this client "
                "after it stayed silent longer than client_timeout)",
            )
        client.last_seen = time.monotonic()
        return client

    def _dispatch(self, routing_id: bytes, msg: Any, arrays: list[Any]) -> None:
        if isinstance(msg, proto.Hello):
            self._on_hello(routing_id, msg)
        elif isinstance(msg, proto.Heartbeat):
            client = self.clients.get(msg.client_id)
            if routing_id not in (msg.client_id, msg.client_id + proto.HEARTBEAT_SUFFIX):
                raise RequestError(
                    ErrorCode.UNAUTHORIZED, "heartbeats must come from the client's own sockets"
                )
            if client is None:
                self._reply(
                    routing_id, proto.Error(ErrorCode.UNKNOWN_CLIENT, "unknown client; it was reclaimed")
                )
                return
            client.last_seen = time.monotonic()
            self._reply(routing_id, proto.Heartbeat(b"", time.time()))
        elif isinstance(msg, proto.Goodbye):
            if msg.client_id in self.clients and routing_id in (
                msg.client_id,
                msg.client_id + proto.HEARTBEAT_SUFFIX,
            ):
                self._drop_client(self.clients[msg.client_id], "said goodbye")
        elif isinstance(msg, proto.OpenStream):
            self._on_open(self._client(routing_id), msg, arrays)
        elif isinstance(msg, proto.Credit):
            stream = self._stream(routing_id, msg.stream_id).stream
            stream.credit(msg.batches, msg.consumed, msg.freed)
            if msg.assign:
                stream.assign(msg.assign)
        elif isinstance(msg, proto.Reseed):
            entry = self._stream(routing_id, msg.stream_id)
            if msg.rng is None:
                raise RequestError(ErrorCode.INVALID_ARGUMENT, "reseed needs the caller's rng state")
            entry.stream.reseed(msg.from_seq, msg.generation, proto.decode_rng_state(msg.rng))
            entry.failed = False
        elif isinstance(msg, proto.CloseStream):
            client = self._client(routing_id)
            closed = client.streams.pop(msg.stream_id, None)
            if closed is not None:
                self._discard(closed)
        elif isinstance(msg, proto.Describe):
            self._client(routing_id)
            found = self.catalog.resolve(msg.source)
            meta = {"name": found.spec.name, **found.spec.metadata}
            self._reply(routing_id, proto.SourceInfo(msg.request_id, found.length, found.fields, meta))
        elif isinstance(msg, proto.Gather):
            self._on_gather(self._client(routing_id), msg, arrays)
        elif isinstance(msg, proto.HaveArrays):
            self._client(routing_id)
            present = [check_key(k) in self.uploads.paths for k in msg.keys]
            self.uploads.touch(msg.keys)  # asked for: kept for the stream that follows
            self._reply(routing_id, proto.ArraysPresent(msg.request_id, present))
        elif isinstance(msg, proto.RegisterArray):
            self._client(routing_id)
            real = self.uploads.prepare_file(msg.key, msg.path)
            if real is None:
                self._reply(routing_id, proto.Ack(msg.request_id))
            else:  # hashed in a thread (hashlib lets go of the GIL): the loop serves on
                self._verifying[real] += 1  # in use: a held copy of that name is not deleted now
                threading.Thread(
                    target=self._verify_file, args=(routing_id, msg.request_id, msg.key, real),
                    name="batchup-verify", daemon=True,
                ).start()  # fmt: skip
        elif isinstance(msg, proto.RegisterCode):
            self._client(routing_id)
            self.functions.register(msg, arrays)
            self._reply(routing_id, proto.Ack(msg.request_id))
        elif isinstance(msg, proto.UploadChunk):
            self._client(routing_id)
            if len(arrays) != 1:
                raise RequestError(ErrorCode.MALFORMED, "upload_chunk should carry exactly 1 array")
            self.uploads.chunk(routing_id, msg, arrays[0])
            self._reply(routing_id, proto.Ack(msg.request_id))
        else:
            raise RequestError(ErrorCode.MALFORMED, f"{msg.TYPE} is not a request a server accepts")

    def _stream(self, routing_id: bytes, stream_id: int) -> StreamEntry:
        client = self._client(routing_id)
        entry = client.streams.get(stream_id)
        if entry is None:
            raise RequestError(ErrorCode.UNKNOWN_STREAM, f"stream {stream_id} is not open")
        return entry

    @staticmethod
    def _check_version(msg: proto.Hello) -> None:
        if len(msg.version) != 2 or not proto.is_compatible((msg.version[0], msg.version[1])):
            raise RequestError(
                ErrorCode.VERSION_MISMATCH,
                f"protocol version mismatch: server speaks {proto.PROTOCOL_VERSION[0]}.x, "
                f"client sent {msg.version}",
            )

    def _on_hello(self, routing_id: bytes, msg: proto.Hello) -> None:
        self._check_version(msg)
        if self.config.token and msg.token != self.config.token:
            raise RequestError(ErrorCode.UNAUTHORIZED, "wrong or missing token")
        if routing_id != msg.client_id:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, "hello must come from the socket named client_id")
        old = self.clients.get(routing_id)
        if old is not None:
            self._drop_client(old, "said hello again")
        elif len(self.clients) >= self.config.max_clients:
            raise RequestError(
                ErrorCode.UNAVAILABLE,
                f"the server serves {len(self.clients)} clients, its max_clients; try again when "
                "one has gone (or raise max_clients in its config)",
            )
        try:
            data = self._socket(zmq.PUSH, client_facing=True)
            data.setsockopt(zmq.SNDHWM, 10000)
            data.connect(msg.data_endpoint)
        except zmq.ZMQError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise RequestError(
                    ErrorCode.UNAVAILABLE,
                    f"the server is out of sockets or file descriptors ({exc}); raise its "
                    "open-file limit (ulimit -n) or lower max_clients",
                ) from exc
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT, f"cannot connect to data endpoint {msg.data_endpoint!r}: {exc}"
            ) from exc
        self.clients[routing_id] = ClientState(
            routing_id,
            routing_id,
            msg.data_endpoint,
            data,
            time.monotonic(),
            bundles=proto.takes_bundles(msg.version),
            supersedes=proto.knows_supersedes(msg.version),
            pid=msg.pid if isinstance(msg.pid, int) else 0,
        )
        log.info("client %s connected (pid %d, data %s)", routing_id.hex()[:8], msg.pid, msg.data_endpoint)
        self._reply(routing_id, self._welcome())

    def _welcome(self) -> proto.Welcome:
        return proto.Welcome(
            list(proto.PROTOCOL_VERSION),
            self.server_id,
            self.host,
            self.shm_dir,
            self.config.heartbeat_interval,
            self.config.client_timeout,
            self.config.max_message_bytes,
            sorted(self.catalog.sources),
            self.functions.trusts,
            sorted(self.functions.registry.transforms),
            self.config.max_credit_batches,
        )

    def _on_health(self, frames: list[Any]) -> None:
        """The health endpoint: a handshake is answered (and forgotten: no session, no
        data connection), a heartbeat echoed; anything else refused."""
        routing_id = frames[0].bytes
        try:
            msg, _ = proto.decode(frames[1:], proto.Limits(max_array_bytes=0, max_arrays=0))
        except proto.ProtocolError as exc:
            reply: Any = proto.Error(ErrorCode.MALFORMED, f"malformed request: {exc}")
        else:
            if isinstance(msg, proto.Hello):
                try:
                    self._check_version(msg)
                    reply = self._welcome()
                except RequestError as exc:
                    reply = proto.Error(exc.code, str(exc))
            elif isinstance(msg, proto.Heartbeat):
                reply = proto.Heartbeat(b"", time.time())
            elif isinstance(msg, proto.Goodbye):
                return
            else:
                reply = proto.Error(
                    ErrorCode.UNAUTHORIZED,
                    f"{self.health_endpoint} is the health endpoint: it answers handshakes only; "
                    f"stream from {self.endpoint}",
                    getattr(msg, "request_id", 0),
                )
        assert self.health is not None
        try:
            self.health.send_multipart([routing_id, *proto.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("cannot answer a health check: %s", exc)

    def _on_open(self, client: ClientState, msg: proto.OpenStream, arrays: list[Any]) -> None:
        if msg.stream_id < 1:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, f"stream_id should be >= 1, got {msg.stream_id}")
        if msg.stream_id in client.streams:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, f"stream {msg.stream_id} is already open")
        if len(client.streams) >= self.config.max_streams_per_client:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"this client has {len(client.streams)} streams open, the server's "
                "max_streams_per_client: close iterators it no longer reads",
            )
        if "composite" in msg.source:
            parts = self.catalog.composite_parts(msg.source)
            entries = [p[0] for p in parts]
            children = msg.plan.get("children") if msg.plan.get("kind") == "composite" else None
            if not isinstance(children, list) or len(children) != len(parts):
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT, "a composite source needs a composite plan, one child each"
                )
            fields: list[int] = []
            row_bytes = sum(sum(e.row_bytes[i] for i in f) + (8 if inc else 0) for e, f, inc in parts)
            n_arrays = sum(len(f) + inc for _, f, inc in parts)
        else:
            entry = self.catalog.resolve(msg.source)
            entries, children, parts = [entry], [msg.plan], []
            fields = self.catalog.select(entry, msg.fields)
            row_bytes = sum(entry.row_bytes[i] for i in fields) + (8 if msg.include_indices else 0)
            n_arrays = len(fields) + 1
        transforms = self.functions.check(msg.transforms)
        try:
            batch_size = check_batch_size(msg.batch_size)
        except (TypeError, ValueError) as exc:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, str(exc)) from exc
        if batch_size * row_bytes > self.config.max_message_bytes:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"batch_size={batch_size} makes batches of {batch_size * row_bytes} bytes, above the "
                f"server's max_message_bytes={self.config.max_message_bytes}",
            )
        if not 1 <= msg.credit_batches <= self.config.max_credit_batches:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"credit_batches should be in [1, {self.config.max_credit_batches}], got {msg.credit_batches}",
            )
        if msg.start_credit != -1 and not 1 <= msg.start_credit <= msg.credit_batches:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"start_credit should be -1 or in [1, credit_batches={msg.credit_batches}], got {msg.start_credit}",
            )
        rng = None
        rng_spec = msg.plan.get("rng")
        if rng_spec is not None:
            try:
                state = proto.decode_rng_state(rng_spec)
            except proto.ProtocolError as exc:
                raise RequestError(ErrorCode.MALFORMED, str(exc)) from exc
            rs = np.random.RandomState()
            rs.set_state(state)
            rng = CountingRNG(rs)
        try:
            plan = build_plan(msg.plan, batch_size, rng, arrays)
            start = msg.credit_batches if msg.start_credit == -1 else msg.start_credit
            window = CreditWindow(start, msg.credit_bytes)  # the rest comes with Credit
        except (KeyError, IndexError, TypeError, ValueError, OverflowError) as exc:
            raise RequestError(ErrorCode.INVALID_ARGUMENT, f"invalid plan: {exc}") from exc
        for child, entry in zip(children, entries):
            self.catalog.check_plan_fits(child, arrays, entry.length)
        stream = StreamEntry(
            client,
            msg.stream_id,
            # an assigned stream is asked for batches within the whole fanned-out stream's
            # credit, which each server's share does not tell; it is within every server's limit
            Stream(
                plan,
                rng,
                window,
                row_bytes,
                msg.assigned,
                self.config.max_credit_batches if msg.assigned else msg.credit_batches,
            ),  # fmt: skip
            entries[0].spec,
            fields,
            msg.include_indices,
            transforms=transforms,
            transform_seed=msg.transform_seed,
            parts=[(e.spec, f, inc) for e, f, inc in parts],
            cost_key=cost_key(msg, batch_size),
        )
        stream.batch_s = client.costs.get(stream.cost_key, 0.0)
        if stream.batch_s:
            log.debug(
                "stream %d: tasks of %d batches from the start (%.2f ms a batch in the client's last such stream)",
                msg.stream_id, group_size(stream.batch_s), stream.batch_s * 1e3,
            )  # fmt: skip
        slots = 0
        if msg.shm:
            slots = self._make_pool(stream, batch_size, row_bytes, n_arrays, msg)
        client.streams[msg.stream_id] = stream
        self._rr.append(stream)
        pool = stream.slot_pool
        self._reply(
            client.routing_id,
            proto.StreamOpened(
                msg.request_id,
                msg.stream_id,
                pool.path if pool else "",
                pool.slot_bytes if pool else 0,
                slots,
            ),
        )

    def _make_pool(
        self, stream: StreamEntry, batch_size: int, row_bytes: int, n_arrays: int, msg: Any
    ) -> int:
        """Give the stream a slot pool (an idle one of its client's, or a new file in the
        shared folder); 0 slots (frames) if none can be made."""
        need = batch_size * (row_bytes + 8) + n_arrays * proto.arrays.SLOT_ALIGN
        slot_bytes = -(-need // 4096) * 4096
        budget = min(msg.credit_bytes, self.config.max_credit_bytes)
        slots = max(MIN_SLOTS, min(msg.credit_batches, budget // slot_bytes))
        client = stream.client
        pool = next((p for p in client.idle_pools if (p.slots, p.slot_bytes) == (slots, slot_bytes)), None)
        if pool is not None:
            client.idle_pools.remove(pool)
        else:
            self._pools_made += 1
            path = os.path.join(self.shm_dir, f"pool-{client.client_id.hex()[:8]}-{self._pools_made}.bin")
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                try:
                    os.ftruncate(fd, slots * slot_bytes)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("cannot create a slot pool (%s); stream %d uses frames", exc, stream.stream_id)
                return 0
            pool = Pool(path, slots, slot_bytes, list(range(slots)))
        stream.slot_pool = pool
        stream.stream.use_slots(pool.free, slots)
        log.debug("stream %d: %d shared-memory slots of %d bytes", stream.stream_id, slots, slot_bytes)
        return slots

    def _discard(self, stream: StreamEntry) -> None:
        """A stream is gone: its pool waits for the client's next stream (a few per client);
        the client arrays it read were used until now (the last to be deleted unused)."""
        self.uploads.touch_paths(_spec_paths([stream.source, *(p[0] for p in stream.parts)]))
        pool = stream.slot_pool
        if pool is None:
            return
        client = stream.client
        client.idle_pools.append(pool)
        while len(client.idle_pools) > IDLE_POOLS:
            self._remove_pool(client.idle_pools.pop(0))

    def _remove_pool(self, pool: Pool) -> None:
        """Delete a pool file (mappings stay valid until their owners unmap them)."""
        try:
            os.unlink(pool.path)
        except OSError:
            pass
        self._tell_workers({"op": "forget_pool", "path": pool.path}, again=True)

    def _tell_workers(self, message: dict[str, Any], again: bool = False) -> list[WorkerHandle]:
        """Send a control message to every worker; returns those that could not take it
        (``again``: those get it on a later round, as :meth:`_send_unsent` can)."""
        packed = msgpack.packb(message)
        missed = []
        for worker in getattr(self, "workers", []):
            try:
                worker.socket.send(packed, zmq.NOBLOCK)
            except zmq.ZMQError:
                missed.append(worker)
                if again:
                    self._unsent.append((worker, packed))
        return missed

    def _send_unsent(self) -> None:
        """Worker messages that found a full queue: try again (to the worker's process of
        now, if it restarted: letting go of what it never held costs nothing)."""
        unsent, self._unsent = self._unsent, []
        for worker, packed in unsent:
            if not any(w is worker for w in self.workers):
                continue
            try:
                worker.socket.send(packed, zmq.NOBLOCK)
            except zmq.ZMQError:
                self._unsent.append((worker, packed))

    def _on_gather(self, client: ClientState, msg: proto.Gather, arrays: list[Any]) -> None:
        entry = self.catalog.resolve(msg.source)
        fields = self.catalog.select(entry, msg.fields)
        if len(arrays) != 1 or arrays[0].ndim != 1 or arrays[0].dtype.kind not in "iu":
            raise RequestError(ErrorCode.INVALID_ARGUMENT, "gather should carry one 1-D integer index array")
        idx = arrays[0]
        nbytes = len(idx) * sum(entry.row_bytes[i] for i in fields)
        if nbytes > self.config.max_message_bytes:
            raise RequestError(
                ErrorCode.TOO_LARGE,
                f"a gather of {len(idx)} rows makes {nbytes} bytes, above the server's "
                f"max_message_bytes={self.config.max_message_bytes}",
            )
        if not in_range(idx, entry.length):
            raise RequestError(ErrorCode.INVALID_ARGUMENT, f"indices out of range for length {entry.length}")
        self._gathers.append((client, msg.request_id, entry.spec, fields, np.array(idx)))

    # ------------------------------------------------------------------ scheduling
    def _free_worker(self) -> WorkerHandle | None:
        """A started worker with room in its queue (a send to it cannot block)."""
        ready = [w for w in self.workers if w.ready]
        if not ready:
            return None
        best = min(ready, key=lambda w: len(w.outstanding))
        return best if len(best.outstanding) < WORKER_DEPTH else None

    def _schedule(self) -> None:
        while self._retry:  # tasks of a dead worker, or that could not be sent
            worker = self._free_worker()
            if worker is None:
                return
            job, task = self._retry.popleft()
            if job.client.client_id in self.clients and not self._send_task(worker, job, [task]):
                return  # its queue refused it (a dead worker not yet noticed): next round
        while self._gathers:
            worker = self._free_worker()
            if worker is None:
                return
            client, request_id, spec, fields, idx = self._gathers.popleft()
            job = Job(client, 0, spec, fields, False, True)
            if client.client_id in self.clients and not self._send_task(
                worker, job, [Task(request_id, 0, idx, None)]
            ):
                return
        idle = 0
        while self._rr and idle < len(self._rr):
            entry = self._rr[0]
            if entry.client.streams.get(entry.stream_id) is not entry:
                self._rr.popleft()  # closed or reclaimed
                continue
            self._rr.rotate(-1)
            if entry.failed or not entry.stream.can_produce():
                idle += 1
                continue
            worker = self._free_worker()
            if worker is None:
                return
            idle = 0
            tasks = self._produce(entry, group_size(entry.batch_s))
            if tasks and not self._send_task(worker, self._job(entry), tasks):
                return

    def _produce(self, entry: StreamEntry, most: int) -> list[Task]:
        """Up to ``most`` of the stream's next batches (its caller checked that it can make
        one); an end of stream or a failure goes to the client at once."""
        tasks: list[Task] = []
        for n in range(most):
            if n and not entry.stream.can_produce():
                break
            try:
                item = entry.stream.produce()
            except Exception as exc:
                self._stream_error(entry, entry.stream.next_seq, exc)
                break
            if item is None:  # an assigned batch past the end, already answered
                continue
            if isinstance(item, End):
                msg = proto.EndOfStream(entry.stream_id, item.seq, item.generation, item.rng, item.final_rng)
                self._send_data(entry.client, proto.encode(msg))
                break
            tasks.append(item)
        return tasks

    @staticmethod
    def _job(entry: StreamEntry) -> Job:
        if entry.job is None:
            entry.job = Job(
                entry.client, entry.stream_id, entry.source, entry.fields, entry.include_indices,
                False,
                entry.slot_pool.path if entry.slot_pool else "",
                entry.slot_pool.slot_bytes if entry.slot_pool else 0,
                tuple(entry.transforms),
                entry.transform_seed,
                tuple(entry.parts),
            )  # fmt: skip
        return entry.job

    def _send_task(self, worker: WorkerHandle, job: Job, tasks: list[Task]) -> bool:
        """One task message: ``tasks`` (batches of one job), one index frame each; ``False``
        when the worker's queue refused it (the tasks then wait in the retry queue, for a
        later round: retrying at once spun the loop for ever on a worker that had died,
        whose death only a later round notices)."""
        self._tasks += 1
        header = {
            **job.wire,
            "task": self._tasks,
            # the reader waits for a stream's first batches: they go as soon as made
            **({"bundle": False} if tasks[0].seq == 0 else {}),
            "batches": [
                [t.seq, t.generation, t.rng, t.slot, list(t.splits or ()), t.indices.dtype.str, t.supersedes]
                for t in tasks
            ],
        }
        try:
            self._send_code(worker, job)
            worker.socket.send_multipart(
                [
                    msgpack.packb(header, use_bin_type=True),
                    *(np.ascontiguousarray(t.indices).data for t in tasks),
                ],
                zmq.NOBLOCK,
                copy=False,
            )
        except zmq.ZMQError as exc:  # never block the router: try again on the next round
            log.warning("cannot send a task to worker %d (%s); will retry", worker.index, exc)
            self._retry.extend((job, t) for t in tasks)
            return False
        worker.outstanding[self._tasks] = (job, tasks)
        return True

    def _send_code(self, worker: WorkerHandle, job: Job) -> None:
        """Hand the worker the client functions the job needs, ahead of the task (the
        worker's task socket is ordered). Raises ``zmq.Again`` when its queue is full."""
        for t in job.transforms:
            key = t.get("code")
            if key is None or key in worker.code:
                continue
            payload, name = self.functions.code[key]
            header = msgpack.packb({"op": "code", "key": key, "name": name}, use_bin_type=True)
            worker.socket.send_multipart([header, payload], zmq.NOBLOCK, copy=False)
            worker.code.add(key)

    def _send_data(self, client: ClientState, frames: list[Any]) -> None:
        try:
            client.data.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            log.warning("cannot send to client %s: %s", client.client_id.hex()[:8], exc)

    def _stream_error(self, entry: StreamEntry, seq: int, exc: BaseException) -> None:
        entry.failed = True
        err = proto.Error(
            ErrorCode.REMOTE_EXCEPTION,
            str(exc),
            0,
            entry.stream_id,
            seq,
            type(exc).__name__,
            "".join(traceback.format_exception(exc)),
            entry.stream.generation,
        )
        self._send_data(entry.client, proto.encode(err))

    def _on_result(self, frames: list[Any]) -> None:
        result = msgpack.unpackb(frames[0].bytes, raw=False)
        worker = self.workers[result["worker"]]
        if result.get("ready"):
            worker.ready = True
            return
        info = worker.outstanding.pop(result["task"], None)
        if info is None:
            return
        job, tasks = info
        client, stream_id = job.client, job.stream_id
        entry = client.streams.get(stream_id)
        if entry is not None and entry.job is job and result["busy"] > 0:  # a batch's cost to a worker
            per_batch = result["busy"] / len(tasks)
            entry.batch_s = per_batch if not entry.batch_s else 0.8 * entry.batch_s + 0.2 * per_batch
            costs = client.costs
            if entry.cost_key not in costs and len(costs) >= COSTS_KEPT:
                del costs[next(iter(costs))]  # the oldest kind of stream
            costs[entry.cost_key] = entry.batch_s
        errors = dict(result["errors"])
        missed = set(result["unused"]) | set(errors)
        if not missed:
            return
        pools = [e.slot_pool for e in client.streams.values()] + client.idle_pools
        pool = next((p for p in pools if p is not None and p.path == job.pool), None)
        for i in sorted(missed):
            slot = tasks[i].slot
            if slot >= 0 and pool is not None and slot not in pool.free:
                pool.free.append(slot)  # the client never got this slot's batch: it is free again
        for i, text in errors.items():
            if entry is not None and not entry.failed and entry.stream.generation == tasks[i].generation:
                entry.failed = True  # the worker already sent the Error to the client
                log.warning("stream %d of client %s failed: %s", stream_id, client.client_id.hex()[:8], text)

    # ------------------------------------------------------------------ liveness
    def _check_workers(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                continue
            log.error("worker %d died (exit code %s); restarting it", worker.index, worker.process.exitcode)
            worker.process.join(0)
            worker.ready = False  # until the new process says it listens
            worker.code = set()
            worker.process = self._spawn(worker.index, worker.endpoint, self._results_endpoint)
            lost, worker.outstanding = worker.outstanding, {}
            self._retry.extend(
                (job, task.again() if job.client.supersedes else task)  # a 1.3 client: into its slot
                for job, tasks in lost.values()
                for task in tasks
            )

    def _refresh_keys(self) -> None:
        if self.auth is None:
            return
        count = self.auth.refresh()
        if count is not None:
            log.info("CURVE: client keys changed; %d authorised key(s) in %s now", count, self.auth.folder)

    def _reap_clients(self, now: float) -> None:
        for client in list(self.clients.values()):
            if now - client.last_seen > self.config.client_timeout:
                self._drop_client(client, f"silent for more than {self.config.client_timeout:g}s")

    def _drop_client(self, client: ClientState, why: str) -> None:
        log.info(
            "client %s %s: reclaiming %d stream(s)", client.client_id.hex()[:8], why, len(client.streams)
        )
        for stream in client.streams.values():
            self._discard(stream)
        for pool in client.idle_pools:
            self._remove_pool(pool)
        client.idle_pools.clear()
        client.streams.clear()
        self.clients.pop(client.routing_id, None)
        self.uploads.forget_owner(client.routing_id)
        if client.pid > 0 and not any(c.pid == client.pid for c in self.clients.values()):
            self.uploads.forget_shares_of(client.pid)
        client.data.close(linger=0)
        self._tell_workers({"op": "forget", "endpoint": client.data_endpoint})

    def _arrays_in_use(self) -> set[str]:
        """The files of client arrays that open streams, queued gathers or tasks read, or
        that are being hashed (a client's copy of a held array, registered again)."""
        specs = []
        for client in self.clients.values():
            for entry in client.streams.values():
                specs += [entry.source, *(p[0] for p in entry.parts)]
        specs += [g[2] for g in self._gathers]
        jobs = [job for job, _ in self._retry]
        jobs += [job for worker in self.workers for job, _ in worker.outstanding.values()]
        for job in jobs:
            specs += [job.source, *(p[0] for p in job.parts)]
        return _spec_paths(specs) | set(self._verifying)

    def _evict_idle(self) -> None:
        """Delete client arrays no one uses beyond the ``idle_array_bytes`` kept for reuse
        (not one asked for in the last ``client_timeout``: its stream may be on the way)."""
        if self.uploads.held_bytes <= self.config.idle_array_bytes:
            return
        in_use = self._arrays_in_use()
        self.uploads.touch_paths(in_use)  # used now: least recently used goes by last use
        gone = self.uploads.evict(in_use, self.config.idle_array_bytes, self.config.client_timeout)
        for path in gone:
            log.info("client array %s is unused and over idle_array_bytes: deleted", os.path.basename(path))
            self._tell_workers({"op": "forget_source", "path": path}, again=True)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop workers (with a timeout, then kill) and close every socket. Idempotent."""
        for client in list(self.clients.values()):
            for stream_id in client.streams:
                notice = proto.Error(ErrorCode.SHUTTING_DOWN, "the server is shutting down", 0, stream_id)
                self._send_data(client, proto.encode(notice))
            client.data.close(linger=500)  # let the notices out
        self.clients.clear()
        for worker in self._tell_workers({"op": "stop"}):
            worker.process.terminate()  # not connected yet (still starting): it cannot hear us
        deadline = time.monotonic() + 3.0
        for worker in getattr(self, "workers", []):
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(1.0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.destroy(linger=0)


def _spec_paths(specs: Any) -> set[str]:
    """The files sources' fields read."""
    return {f.path for spec in specs for f in spec.fields}


def make_curve_server(sock: zmq.Socket[Any], keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE server with the server's key pair (before bind/connect)."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)


class Authenticator:
    """A ZAP handler in a context, admitting the public keys in ``keys.clients_dir``.

    It serves every CURVE socket of the context, whichever side connects. :meth:`refresh`
    re-reads the folder when its ``*.key`` files changed, so a client key added (or
    removed) takes effect for new connections without a restart."""

    def __init__(self, ctx: zmq.Context[Any], keys: CurveKeys):
        from zmq.auth.thread import ThreadAuthenticator

        self.folder = keys.clients_dir
        self.stamp = self._stamp()
        self.thread = ThreadAuthenticator(ctx, log=logging.getLogger("batchup_server.auth"))
        self.thread.start()
        self.thread.configure_curve(domain="*", location=self.folder)

    def _stamp(self) -> tuple[tuple[str, int], ...]:
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(".key"))
            return tuple((n, os.stat(os.path.join(self.folder, n)).st_mtime_ns) for n in names)
        except OSError:
            return ()

    def refresh(self) -> int | None:
        """Reload the keys if the folder changed; the number of keys now, or None."""
        stamp = self._stamp()
        if stamp == self.stamp:
            return None
        self.stamp = stamp
        self.thread.configure_curve(domain="*", location=self.folder)
        return len(stamp)

    def stop(self) -> None:
        self.thread.stop()


def start_authenticator(ctx: zmq.Context[Any], keys: CurveKeys) -> Authenticator:
    """Start the ZAP handler of ``ctx`` (see :class:`Authenticator`)."""
    return Authenticator(ctx, keys)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return os.getppid() != 1 or pid == 1


# ---------------------------------------------------------------------- worker process
def worker_main(
    index: int,
    task_endpoint: str,
    results_endpoint: str,
    parent_pid: int,
    plugins: tuple[str, ...] = (),
    curve: CurveKeys | None = None,
) -> None:
    """A worker process: gather rows for tasks and send batches straight to clients.

    With ``curve`` its PUSH sockets to clients are CURVE servers, checked by a ZAP handler
    of its own (the router's cannot serve another process's sockets)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_malloc()  # gathered batches reuse freed heap memory instead of faulting fresh pages
    registry = load_plugins(plugins)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, ZMQ_MAX_SOCKETS)  # a socket per client it sends to
    auth = start_authenticator(ctx, curve) if curve is not None else None
    tasks = ctx.socket(zmq.PULL)
    tasks.setsockopt(zmq.LINGER, 0)
    tasks.connect(task_endpoint)
    results = ctx.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 0)
    results.connect(results_endpoint)
    results.send(msgpack.packb({"worker": index, "ready": True}))  # tasks may come now
    clients: dict[str, zmq.Socket[Any]] = {}
    runner = TaskRunner(registry)
    next_refresh = time.monotonic() + 1.0
    try:
        while True:
            if auth is not None and time.monotonic() >= next_refresh:
                auth.refresh()  # client keys added or removed since
                next_refresh = time.monotonic() + 1.0
            if not tasks.poll(500):
                if os.getppid() != parent_pid:
                    return  # the server died; do not linger
                continue
            frames = tasks.recv_multipart(copy=False)
            header = msgpack.unpackb(frames[0].bytes, raw=False)
            op = header["op"]
            if op == "stop":
                return
            if op == "forget":
                sock = clients.pop(header["endpoint"], None)
                if sock is not None:
                    sock.close(linger=0)
                continue
            if op == "forget_pool":
                runner.forget_pool(header["path"])
                continue
            if op == "forget_source":
                runner.forget_source(header["path"])
                continue
            if op == "code":  # a trusted client's function, ahead of the tasks that use it
                try:
                    runner.code.add(header["key"], frames[1].bytes)
                except Exception as exc:  # reported by the tasks that need it
                    log.warning("worker %d cannot load %s: %r", index, header.get("name"), exc)
                continue
            endpoint = header["endpoint"]
            sock = clients.get(endpoint)
            if sock is None:
                sock = clients[endpoint] = ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 10000)
                if curve is not None:
                    make_curve_server(sock, curve)
                sock.connect(endpoint)
            started = time.perf_counter()
            errors, unused = _run_task(runner, header, frames[1:], sock)
            busy = time.perf_counter() - started
            reply = {
                "worker": index,
                "task": header["task"],
                "errors": errors,
                "unused": unused,
                "busy": busy,
            }
            results.send(msgpack.packb(reply))
    finally:
        runner.close()
        if auth is not None:
            auth.stop()
        ctx.destroy(linger=0)


def _run_task(
    runner: TaskRunner, header: dict[str, Any], index_frames: list[Any], sock: zmq.Socket[Any]
) -> tuple[list[tuple[int, str]], list[int]]:
    """Make a task's batches and send them to the client; returns the failed ones (with
    why) and those whose slot went unused.

    With ``header["bundle"]`` finished batches wait (for :func:`bundle_hold` after the
    first of them was ready) and go as one bundle: one message, one wake-up of the client,
    for several batches (PROTOCOL.md, "Bundles")."""
    errors: list[tuple[int, str]] = []
    unused: list[int] = []
    pending: list[Any] = []
    held: list[int] = []  #: batches in ``pending``
    since = 0.0
    started = time.perf_counter()
    last = len(index_frames) - 1
    for i, (batch, frame) in enumerate(zip(header["batches"], index_frames, strict=True)):
        seq, gen, rng, slot, splits, index_dtype, supersedes = batch
        task = {
            **header,
            "seq": seq,
            "gen": gen,
            "rng": rng,
            "slot": slot,
            "splits": splits,
            "supersedes": supersedes,
        }
        msg, arrays, error = runner.run(task, np.frombuffer(frame.buffer, dtype=np.dtype(index_dtype)))
        if error:
            errors.append((i, error))
        elif slot >= 0 and getattr(msg, "slot", 0) < 0:
            unused.append(i)  # a transformed batch too big for its slot went as frames
        if not pending:
            since = time.perf_counter()
        pending += proto.encode(msg, arrays)
        held.append(i)
        now = time.perf_counter()
        if header["bundle"] and i < last and now - since < bundle_hold(now - started, i + 1):
            continue
        try:
            sock.send_multipart(pending, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            failed = {j for j, _ in errors}
            errors += [(j, f"cannot send to {header['endpoint']}: {exc}") for j in held if j not in failed]
        pending, held = [], []
    return errors, unused
