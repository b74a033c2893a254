"""Bad input gets a typed error naming what was wrong; the server keeps serving others."""

from __future__ import annotations

import os
import secrets
import socket

import msgpack
import numpy as np
import pytest
import zmq

import batchup_client
import batchup_protocol as proto
from batchup_protocol import ErrorCode
from batchup_server.demo import make_demo_arrays
from tests.servers import wait_until

pytestmark = pytest.mark.integration


class RawPeer:
    """A hand-driven DEALER, for sending what the client library never would."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.client_id = secrets.token_bytes(16)
        self.sock.setsockopt(zmq.ROUTING_ID, self.client_id)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.data = self.ctx.socket(zmq.PULL)
        self.data.setsockopt(zmq.LINGER, 0)
        port = self.data.bind_to_random_port("tcp://127.0.0.1")
        self.data_endpoint = f"tcp://127.0.0.1:{port}"

    def send_raw(self, frames):
        self.sock.send_multipart(frames)

    def send(self, msg, arrays=()):
        self.sock.send_multipart(proto.encode(msg, arrays))

    def recv(self):
        assert self.sock.poll(10000), "no answer from the server"
        return proto.decode(self.sock.recv_multipart())[0]

    def recv_data(self):
        """The next message of the data socket (bundles taken apart): ``(msg, arrays)``."""
        pending = self.__dict__.setdefault("_pending", [])
        if not pending:
            assert self.data.poll(10000), "no batch from the server"
            pending += proto.decode_bundle(self.data.recv_multipart())
        return pending.pop(0)

    def hello(self, version=None):
        self.send(proto.Hello(list(version or proto.PROTOCOL_VERSION), self.client_id, self.data_endpoint))
        return self.recv()

    def close(self):
        self.ctx.destroy(linger=0)


@pytest.fixture
def peer(server):
    p = RawPeer(server.endpoint)
    yield p
    p.close()


def assert_still_serving(server):
    with batchup_client.connect(server.endpoint) as client:
        assert len(list(client.source("demo").batch_iterator(batch_size=6000))) == 2


def test_garbage_bytes_on_the_port(server):
    with socket.create_connection(("127.0.0.1", int(server.endpoint.rsplit(":", 1)[1]))) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n" + bytes(range(256)) * 4)
    server.wait_for_log("malformed request|rejected a connection")
    assert_still_serving(server)


@pytest.mark.parametrize(
    "frames, text",
    [
        ([b"\xc1\xc1not msgpack"], "header is not a msgpack map"),
        ([msgpack.packb([1, 2, 3])], "header should be a msgpack map"),
        ([msgpack.packb({"type": "launch_missiles"})], "unknown message type"),
        ([msgpack.packb({"type": "hello", "version": [1, 0]})], "missing required field 'client_id'"),
        (
            [msgpack.packb({"type": "credit", "stream_id": "x", "batches": 1, "consumed": 0})],
            "credit.stream_id",
        ),
        ([msgpack.packb({"type": "ack", "request_id": 1, "arrays": [["<f4", [2]]]})], "announces 1 array"),
    ],
)
def test_malformed_frames_get_a_malformed_error(server, peer, frames, text):
    peer.send_raw(frames)
    reply = peer.recv()
    assert isinstance(reply, proto.Error) and reply.code == ErrorCode.MALFORMED
    assert text in reply.message
    server.wait_for_log("malformed request")
    assert_still_serving(server)


def test_wrong_protocol_version(server, peer):
    reply = peer.hello(version=(99, 0))
    assert isinstance(reply, proto.Error) and reply.code == ErrorCode.VERSION_MISMATCH
    assert "99" in reply.message


def test_client_raises_version_mismatch(server, monkeypatch):
    monkeypatch.setattr(proto, "PROTOCOL_VERSION", (7, 3))
    with pytest.raises(batchup_client.VersionMismatchError, match="version mismatch"):
        batchup_client.connect(server.endpoint)
    monkeypatch.undo()
    assert_still_serving(server)


def test_request_before_hello(server, peer):
    peer.send(proto.Describe(1, {"name": "demo"}))
    reply = peer.recv()
    assert reply.code == ErrorCode.UNKNOWN_CLIENT and "send hello first" in reply.message


def test_unknown_source_names_the_known_ones(server):
    with batchup_client.connect(server.endpoint) as client:
        with pytest.raises(batchup_client.UnknownSourceError, match=r"unknown source 'nope'.*\['demo'\]"):
            client.source("nope")
        with pytest.raises(LookupError):
            client.source("nope")
        assert len(list(client.source("demo").batch_iterator(batch_size=6000))) == 2


def test_bad_batch_sizes(server):
    with batchup_client.connect(server.endpoint) as client:
        src = client.source("demo")
        for bad in (0, -5):
            it = src.batch_iterator(batch_size=bad)
            with pytest.raises(
                ValueError, match=f"batch_size should be a positive integer, but got batch_size={bad}"
            ):
                next(it)
        with pytest.raises(TypeError, match="batch_size"):
            next(src.batch_iterator(batch_size=2.5))
        for bad in (0, -1):  # batchup: ZeroDivisionError for 0, an empty result for -1
            for call in (src.batch_map_concat, src.batch_map_mean):
                with pytest.raises(ValueError, match=f"positive integer, but got batch_size={bad}"):
                    call(lambda X, y: (X.sum(),), batch_size=bad)
                with pytest.raises(ValueError, match=f"positive integer, but got batch_size={bad}$"):
                    call(lambda X, y: (X.sum(),), batch_size=bad, rank=0, world_size=2)
        with pytest.raises(batchup_client.TooLargeError, match="max_message_bytes"):
            next(src.batch_iterator(batch_size=10**9))
        with pytest.raises(ValueError, match="batch_size should be below 2\\*\\*62"):
            next(src.batch_iterator(batch_size=2**70))  # msgpack cannot carry it
        assert len(list(src.batch_iterator(batch_size=6000))) == 2
        # numpy integers, as batchup takes them (msgpack could not pack one)
        for size in (np.int64(6000), np.int32(6000), np.uint16(6000)):
            assert [len(b[0]) for b in src.batch_iterator(batch_size=size)] == [6000, 6000]
            (sums,) = src.batch_map_concat(lambda X, y: (X.sum(axis=1),), batch_size=size)
            assert sums.shape == (12000,)
            assert len(src.batch_map_mean(lambda X, y: (X.sum(),), batch_size=size)) == 1


def test_raw_open_stream_argument_errors(server, peer):
    assert isinstance(peer.hello(), proto.Welcome)
    plan = {"kind": "standard", "length": 12000, "repeats": 1}
    cases = [
        (dict(batch_size=-1), ErrorCode.INVALID_ARGUMENT, "batch_size"),
        (dict(batch_size=10**12), ErrorCode.TOO_LARGE, "max_message_bytes"),
        (dict(credit_batches=0), ErrorCode.INVALID_ARGUMENT, "credit_batches"),
        (dict(plan={"kind": "standard", "length": 5, "repeats": 1}), ErrorCode.INVALID_ARGUMENT, "length"),
        (
            dict(plan={"kind": "standard", "length": 12000, "repeats": 0}),
            ErrorCode.INVALID_ARGUMENT,
            "repeats",
        ),
        (dict(plan={"kind": "spiral"}), ErrorCode.INVALID_ARGUMENT, "plan kind"),
        (dict(fields=["Z"]), ErrorCode.INVALID_ARGUMENT, "no field"),
        (dict(source={"name": "nope"}), ErrorCode.UNKNOWN_SOURCE, "unknown source"),
        (dict(source={"arrays": ["sha256:00"]}), ErrorCode.UNKNOWN_SOURCE, "no array"),
    ]
    for i, (override, code, text) in enumerate(cases):
        args = dict(
            request_id=i + 1,
            stream_id=i + 1,
            source={"name": "demo"},
            plan=plan,
            batch_size=10,
            include_indices=False,
            credit_batches=4,
            credit_bytes=1 << 20,
        )
        args.update(override)
        peer.send(proto.OpenStream(**args))
        reply = peer.recv()
        assert isinstance(reply, proto.Error), override
        assert reply.code == code and text in reply.message and reply.request_id == i + 1, (override, reply)
    peer.send(
        proto.OpenStream(
            99, 99, {"name": "demo"}, {"kind": "subset", "repeats": 1, "indices": 0}, 10, False, 4, 1 << 20
        ),
        [np.array([5, 12000])],
    )
    reply = peer.recv()
    assert reply.code == ErrorCode.INVALID_ARGUMENT and "out of range" in reply.message
    peer.send(proto.Credit(12345, 1, 0))
    assert peer.recv().code == ErrorCode.UNKNOWN_STREAM
    assert_still_serving(server)


def test_plans_with_bad_fields_or_arrays_are_refused_when_opened(server, peer):
    """Found by a fuzzing review: each was accepted and failed later in a worker, or was an
    untyped INTERNAL error, or (a 2-D index array) made batches beyond max_message_bytes."""
    assert isinstance(peer.hello(), proto.Welcome)
    std = {"kind": "standard", "length": 12000}
    sub = {"kind": "subset", "indices": 0}
    cases = [
        ({**std, "repeats": float("inf")}, [], "repeats should be an integer"),
        ({**std, "length": float("inf")}, [], "length should be an integer"),
        ({**std, "repeats": "3"}, [], "repeats should be an integer"),
        ({**std, "length": "12000"}, [], "length should be an integer"),
        ({**sub, "indices": -1}, [np.array([1, 2])], "position of one of the 1 attached arrays"),
        ({**sub, "indices": True}, [np.array([1, 2])], "position of one of the 1 attached arrays"),
        (sub, [np.array([1.5, 1e12])], "1-D array of integers"),
        (sub, [np.array([True, False])], "1-D array of integers"),
        (sub, [np.zeros((1, 100000), np.int32)], "1-D array of integers"),
        (
            {"kind": "weighted", "weights": 0},
            [np.full(20000, 1 / 20000)],
            "at most one weight per row of the source",
        ),
        (
            {"kind": "weighted_subset", "weights": 0, "indices": 1},
            [np.full(3, 1 / 3), np.array([1, 2])],
            "weights (3) and indices (2) should be as long",
        ),
    ]
    for i, (plan, arrays, text) in enumerate(cases):
        plan = {**plan, "rng": proto.encode_rng_state(np.random.RandomState(0).get_state())}
        peer.send(proto.OpenStream(i + 1, i + 1, {"name": "demo"}, plan, 10, False, 4, 1 << 20), arrays)
        reply = peer.recv()
        assert isinstance(reply, proto.Error), plan
        assert reply.code == ErrorCode.INVALID_ARGUMENT and text in reply.message, (plan, reply)
    state = proto.encode_rng_state(np.random.RandomState(0).get_state())
    bad_state = {**state, "has_gauss": 2**63}
    peer.send(proto.OpenStream(50, 50, {"name": "demo"}, {**std, "rng": bad_state}, 10, False, 4, 1 << 20))
    reply = peer.recv()
    assert reply.code == ErrorCode.MALFORMED and "has_gauss" in reply.message
    assert_still_serving(server)


def test_a_refused_reseed_changes_nothing(server, peer):
    """A reseed the server refused (an RNG state numpy rejects) had already rewound the
    plan: the next batches came from a new permutation, with no error. Now it is refused
    whole, and the stream goes on as batchup's."""
    assert isinstance(peer.hello(), proto.Welcome)
    rs = np.random.RandomState(0)
    state = proto.encode_rng_state(rs.get_state())
    plan = {"kind": "standard", "length": 12000, "repeats": 1, "rng": state}
    peer.send(proto.OpenStream(1, 1, {"name": "demo"}, plan, 500, True, 2, 1 << 24))
    assert isinstance(peer.recv(), proto.StreamOpened)
    first = [peer.recv_data() for _ in range(2)]
    peer.send(proto.Reseed(1, 0, 1, {**state, "has_gauss": 2**63}))
    reply = peer.recv()
    assert reply.code == ErrorCode.MALFORMED, reply
    peer.send(proto.Credit(1, 2, 2))
    later = [peer.recv_data() for _ in range(2)]
    order = np.random.RandomState(0).permutation(12000)
    got = [arrays[0] for _, arrays in first + later]
    for k, idx in enumerate(got):
        np.testing.assert_array_equal(idx, order[500 * k : 500 * (k + 1)])
    assert_still_serving(server)


def test_unsupported_dtypes_are_refused(server, peer):
    with batchup_client.connect(server.endpoint) as client:
        with pytest.raises(batchup_client.UnsupportedDtypeError, match="cannot travel"):
            client.array_source([np.array([object(), 1, "x"], dtype=object)])
        with pytest.raises(TypeError):
            client.array_source([np.array(["a", "b"])])
    assert isinstance(peer.hello(), proto.Welcome)
    header = msgpack.packb(
        {
            "type": "upload_chunk",
            "request_id": 3,
            "key": "sha256:" + "0" * 64,
            "dtype": "|O8",
            "shape": [1],
            "offset": 0,
            "arrays": [["|u1", [8]]],
        }
    )
    peer.send_raw([header, b"\0" * 8])
    reply = peer.recv()
    assert reply.code == ErrorCode.UNSUPPORTED_DTYPE
    peer.send(proto.UploadChunk(4, "sha256:" + "0" * 64, "<U3", [1], 0), [np.zeros(12, np.uint8)])
    assert peer.recv().code in (ErrorCode.UNSUPPORTED_DTYPE, ErrorCode.MALFORMED)


def test_mismatched_array_lengths(server, peer):
    with batchup_client.connect(server.endpoint) as client:
        with pytest.raises(ValueError, match="inconsistent length"):
            client.array_source([np.zeros(5), np.zeros(4)])
        k1, k2 = client.ensure_arrays([np.zeros(5), np.ones(4)])
    assert isinstance(peer.hello(), proto.Welcome)
    peer.send(proto.Describe(1, {"arrays": [k1, k2]}))
    reply = peer.recv()
    assert reply.code == ErrorCode.INVALID_ARGUMENT and "different lengths" in reply.message


def test_corrupt_upload_is_rejected_and_loses_nothing(server, peer):
    assert isinstance(peer.hello(), proto.Welcome)
    data = np.arange(10, dtype=np.int64)
    key = proto.host.content_key(data)
    peer.send(proto.UploadChunk(1, key, data.dtype.str, [10], 0), [data.view(np.uint8)[:40]])
    assert isinstance(peer.recv(), proto.Ack)
    peer.send(proto.UploadChunk(2, key, data.dtype.str, [10], 0), [data.view(np.uint8)[40:]])
    assert "does not continue" in peer.recv().message  # out-of-order chunk
    bad = data.copy()
    bad[3] = 99
    peer.send(proto.UploadChunk(3, key, data.dtype.str, [10], 0), [bad.view(np.uint8)])
    reply = peer.recv()
    assert reply.code == ErrorCode.INVALID_ARGUMENT and "do not match" in reply.message
    peer.send(proto.HaveArrays(4, [key]))
    assert peer.recv().present == [False]
    with batchup_client.connect(server.endpoint, share_memory=False) as client:
        (got,) = client.array_source([data]).samples_by_indices(np.arange(10))
        np.testing.assert_array_equal(got, data)


def test_array_keys_name_no_path_and_a_shared_file_must_hold_its_keys_bytes(server, peer, tmp_path):
    """Found by a fuzzing review: an upload's key named its file, so "../x" or "/x" wrote
    anywhere the server could; and a client could register its own file under another
    array's key, which then served those bytes to everyone asking for that array."""
    welcome = peer.hello()
    assert isinstance(welcome, proto.Welcome)
    data = np.arange(10, dtype=np.int64)
    for i, key in enumerate(
        [str(tmp_path / "abs"), "../../" + str(tmp_path)[1:] + "/trav", "k", "sha256:XYZ"]
    ):
        peer.send(proto.UploadChunk(10 + i, key, "<i8", [10], 0), [data.view(np.uint8)])
        reply = peer.recv()
        assert reply.code == ErrorCode.INVALID_ARGUMENT and "'sha256:' and 64 hex digits" in reply.message
    assert not list(tmp_path.iterdir())  # nothing written outside the server's folder
    key = proto.host.content_key(data)
    for i, shape in enumerate([["a"], [None], [[2]], [1.5]]):
        peer.send(proto.UploadChunk(20 + i, key, "<i8", shape, 0), [data.view(np.uint8)])
        reply = peer.recv()
        assert reply.code == ErrorCode.INVALID_ARGUMENT and "shape" in reply.message, (shape, reply)
    peer.send(proto.HaveArrays(30, [[]]))
    assert peer.recv().code == ErrorCode.INVALID_ARGUMENT
    # the victim's array, its key known to the attacker; the attacker's own bytes in the folder
    victim = np.arange(10.0)
    victim_key = proto.host.content_key(victim)
    mine = np.full(10, 666.0)
    path = os.path.join(welcome.shm_dir, proto.host.content_key(mine).replace(":", "-") + ".npy")
    np.save(path, mine)
    peer.send(proto.RegisterArray(31, victim_key, path))
    reply = peer.recv()
    assert reply.code == ErrorCode.INVALID_ARGUMENT and "do not match key" in reply.message
    peer.send(proto.HaveArrays(32, [victim_key]))
    assert peer.recv().present == [False]
    with batchup_client.connect(server.endpoint) as client:
        (got,) = client.array_source([victim]).samples_by_indices(np.arange(10))
        np.testing.assert_array_equal(got, victim)  # its own bytes, not the attacker's
    peer.send(proto.RegisterArray(33, victim_key, path))  # held already: kept as it is
    assert isinstance(peer.recv(), proto.Ack)
    with batchup_client.connect(server.endpoint, share_memory=False) as client:
        (got,) = client.array_source([victim]).samples_by_indices(np.arange(10))
        np.testing.assert_array_equal(got, victim)
    assert_still_serving(server)


def test_wrong_token(tmp_path):
    from tests.servers import RunningServer

    with RunningServer("--token", "s3cret", "--workers", "1") as srv:
        with pytest.raises(batchup_client.RemoteError, match="token") as info:
            batchup_client.connect(srv.endpoint)
        assert info.value.code == ErrorCode.UNAUTHORIZED
        with batchup_client.connect(srv.endpoint, token="s3cret") as client:
            assert client.sources == ["demo"]


def test_heartbeat_or_goodbye_for_another_client_is_refused(server, peer):
    with batchup_client.connect(server.endpoint) as victim:
        peer.send(proto.Heartbeat(victim.client_id, 0.0))
        assert peer.recv().code == ErrorCode.UNAUTHORIZED
        peer.send(proto.Goodbye(victim.client_id))  # ignored: not the victim's socket
        assert len(list(victim.source("demo").batch_iterator(batch_size=6000))) == 2


def test_bad_arguments_to_connect_and_source_are_typed(server):
    """Found by a user walk-through: connect([]) started a private server, connect(5555)
    failed inside with "'int' object is not iterable", source(5) was a RemoteError."""
    with pytest.raises(ValueError, match="empty list of addresses"):
        batchup_client.connect([])
    for bad in (5555, [5555], {"a": 1}):
        with pytest.raises(TypeError, match="address should be a string"):
            batchup_client.connect(bad)
    with batchup_client.connect(server.endpoint) as client:
        with pytest.raises(TypeError, match="a source's name should be a string, got 5"):
            client.source(5)
        with pytest.raises(TypeError, match="repeats should be an integer"):
            client.source("demo", repeats=1.5)  # batchup loops for ever on it
        X, y = make_demo_arrays()
        # one sample by a scalar index: its row, as numpy indexing (and batchup) give it
        got = client.source("demo").samples_by_indices(np.int64(3))
        np.testing.assert_array_equal(got[0], X[3])
        assert got[1] == y[3] and np.ndim(got[1]) == 0
        ndx, x3, y3 = client.source("demo", include_indices=True).samples_by_indices(3)
        assert ndx == 3 and y3 == y[3]
        np.testing.assert_array_equal(x3, X[3])


def test_the_servers_limits_on_clients_streams_bytes_and_gathers(tmp_path):
    """Found by a fuzzing review: about 1,020 clients exhausted ZeroMQ's sockets and every
    later Hello was refused as the client's fault; streams and their byte budgets were the
    client's to set (four streams filled 1 GB of /dev/shm in 8 s); a gather had no size
    limit. Each is a server option now, refused with a typed error or cut to the limit."""
    from tests.servers import RunningServer

    (tmp_path / "s.toml").write_text(
        "[server]\nmax_clients = 2\nmax_streams_per_client = 3\nmax_credit_bytes = 4194304\n"
        "max_message_bytes = 1048576\n"
    )
    with RunningServer("--config", str(tmp_path / "s.toml"), "--workers", "1") as srv:
        one = batchup_client.connect(srv.endpoint)
        two = batchup_client.connect(srv.endpoint)
        with pytest.raises(batchup_client.ConnectionLost, match="serves 2 clients, its max_clients"):
            batchup_client.connect(srv.endpoint)
        two.close()
        wait_until(lambda: _connects(srv.endpoint), what="a place for another client")
        src = one.source("demo", repeats=-1)
        its = [src.batch_iterator(batch_size=100) for _ in range(3)]
        for it in its:
            next(it)
        with pytest.raises(
            batchup_client.InvalidArgumentError, match="3 streams open, the server's max_streams_per_client"
        ):
            next(src.batch_iterator(batch_size=100))
        its.pop().close()
        assert len(next(src.batch_iterator(batch_size=100))[0]) == 100  # room again
        # a gather above max_message_bytes is refused by the server and asked again in
        # halves by the client (batchup indexes any number of rows at once)
        X, y = src.samples_by_indices(np.zeros(100000, np.int64))
        assert X.nbytes > 1048576 and len(y) == 100000
        first = src.samples_by_indices(np.zeros(1, np.int64))
        assert (X == first[0]).all() and (y == first[1]).all()
        peer = RawPeer(srv.endpoint)
        try:
            assert isinstance(peer.hello(), proto.Welcome)
            plan = {"kind": "standard", "length": 12000, "repeats": -1}
            peer.send(proto.OpenStream(1, 1, {"name": "demo"}, plan, 1000, False, 256, 2**62, shm=True))
            opened = peer.recv()
            assert isinstance(opened, proto.StreamOpened), opened
            assert opened.slots * opened.slot_bytes <= max(4 * opened.slot_bytes, 4 << 20)
        finally:
            peer.close()
        one.close()


def _connects(endpoint):
    try:
        batchup_client.connect(endpoint, timeout=2).close()
        return True
    except batchup_client.ConnectionLost:
        return False
