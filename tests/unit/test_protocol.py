"""The codec (batchup_protocol): round trips, evolution rules and every way to be rejected.

Pure logic: frames are ``bytes`` (or ``zmq.Frame`` objects built in memory), no sockets.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

import batchup_protocol as proto
from batchup_protocol import (
    FrameTooLarge,
    Limits,
    MalformedFrame,
    ProtocolError,
    UnknownMessage,
    UnsupportedDtype,
)

CLIENT_ID = b"\x01" * 16
RNG = proto.encode_rng_state(np.random.RandomState(3).get_state())  # type: ignore[arg-type]

#: One instance of every message type, with the arrays it travels with.
SAMPLES: dict[str, tuple[Any, list[np.ndarray[Any, Any]]]] = {
    "hello": (proto.Hello([1, 0], CLIENT_ID, "ipc:///tmp/x/data", "h/b", "tok", 12), []),
    "welcome": (proto.Welcome([1, 0], "srv", "h/b", "/dev/shm/x", 0.5, 10.0, 1 << 20, ["a"]), []),
    "describe": (proto.Describe(1, {"name": "demo"}), []),
    "source_info": (proto.SourceInfo(1, 10, [{"name": "X", "dtype": "<f4", "shape": [3]}]), []),
    "open_stream": (
        proto.OpenStream(
            2,
            1,
            {"arrays": ["sha256:00"]},
            {"kind": "subset", "repeats": 2, "indices": 0, "rng": RNG},
            3,
            False,
            4,
            1 << 20,
        ),
        [np.array([4, 2, 0], dtype="<i4")],
    ),
    "stream_opened": (proto.StreamOpened(2, 1), []),
    "credit": (proto.Credit(1, 1, 1), []),
    "reseed": (proto.Reseed(1, 3, 2, RNG), []),
    "close_stream": (proto.CloseStream(1), []),
    "batch": (
        proto.Batch(1, 0, 0, RNG),
        [np.arange(6, dtype=">f8").reshape(2, 3), np.array([True, False])],
    ),
    "end_of_stream": (proto.EndOfStream(1, 4, 2, RNG), []),
    "gather": (proto.Gather(5, {"name": "demo"}), [np.array([1, 2], dtype="<u8")]),
    "gather_result": (proto.GatherResult(5), [np.ones((2, 2), dtype="<c16")]),
    "have_arrays": (proto.HaveArrays(6, ["sha256:00", "sha256:11"]), []),
    "arrays_present": (proto.ArraysPresent(6, [False, True]), []),
    "register_array": (proto.RegisterArray(7, "sha256:00", "/dev/shm/x/sha256-00.npy"), []),
    "register_code": (proto.RegisterCode(8, "sha256:00", "m.f"), [np.frombuffer(b"\x80\x05N.", np.uint8)]),
    "upload_chunk": (
        proto.UploadChunk(8, "sha256:11", "<i2", [2, 2], 4),
        [np.array([1, 0, 2, 0], dtype="|u1")],
    ),
    "ack": (proto.Ack(8), []),
    "error": (proto.Error(proto.ErrorCode.UNKNOWN_SOURCE, "no such source"), []),
    "heartbeat": (proto.Heartbeat(CLIENT_ID), []),
    "goodbye": (proto.Goodbye(CLIENT_ID), []),
}


def wire(frames: list[Any]) -> list[bytes]:
    """Frames as they would arrive: plain bytes."""
    return [np.ascontiguousarray(f).tobytes() if isinstance(f, np.ndarray) else bytes(f) for f in frames]


def header(fields: dict[str, Any]) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


def header_of(msg: Any) -> dict[str, Any]:
    return msgpack.unpackb(proto.encode(msg)[0], raw=False)  # type: ignore[no-any-return]


DEFAULT_LIMITS = Limits()


def roundtrip(arrays: list[Any], limits: Limits = DEFAULT_LIMITS) -> list[np.ndarray[Any, Any]]:
    _, out = proto.decode(wire(proto.encode(proto.Ack(1), arrays)), limits)
    return out


def assert_same_array(got: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]) -> None:
    assert got.dtype.str == expected.dtype.str
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------- round trips
def test_samples_cover_every_message_type() -> None:
    assert set(SAMPLES) == set(proto.MESSAGE_TYPES)
    for name, (msg, _) in SAMPLES.items():
        assert proto.MESSAGE_TYPES[name] is type(msg)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_roundtrip_every_message_type(name: str) -> None:
    msg, arrays = SAMPLES[name]
    frames = proto.encode(msg, arrays)
    assert len(frames) == 1 + len(arrays)
    got, got_arrays = proto.decode(wire(frames))
    assert got == msg
    assert len(got_arrays) == len(arrays)
    for g, e in zip(got_arrays, arrays):
        assert_same_array(g, e)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_roundtrip_without_converting_frames(name: str) -> None:
    """decode accepts what encode returns (arrays as frames) as well as bytes."""
    msg, arrays = SAMPLES[name]
    got, got_arrays = proto.decode(proto.encode(msg, arrays))
    assert got == msg
    for g, e in zip(got_arrays, arrays):
        assert_same_array(g, e)


def test_header_is_type_then_fields_in_declaration_order_then_arrays() -> None:
    msg, arrays = SAMPLES["batch"]
    fields = msgpack.unpackb(proto.encode(msg, arrays)[0], raw=False)
    assert list(fields) == ["type", "stream_id", "seq", "generation", "rng", "slot", "layout", "arrays"]
    assert fields["type"] == "batch"
    assert fields["arrays"] == [[">f8", [2, 3]], ["|b1", [2]]]


def test_no_arrays_entry_without_arrays() -> None:
    assert "arrays" not in header_of(proto.Ack(1))


def test_bytes_travel_as_bin_and_str_as_str() -> None:
    raw = msgpack.unpackb(proto.encode(SAMPLES["hello"][0])[0], raw=True)
    assert raw[b"client_id"] == CLIENT_ID  # bin: bytes even with raw=True ...
    assert raw[b"data_endpoint"] == b"ipc:///tmp/x/data"  # ... str: utf-8
    packed = proto.encode(SAMPLES["hello"][0])[0]
    assert b"\xc4\x10" + CLIENT_ID in packed  # bin 8 of 16 bytes


def test_defaults_fill_fields_an_older_peer_did_not_send() -> None:
    msg, _ = proto.decode([header({"type": "error", "code": 4, "message": "bad"})])
    assert msg == proto.Error(4, "bad", 0, 0, -1, "", "")
    msg, _ = proto.decode([header({"type": "batch", "stream_id": 1, "seq": 2, "generation": 0})])
    assert msg == proto.Batch(1, 2, 0, None)
    msg, _ = proto.decode(
        [
            header(
                {
                    "type": "welcome",
                    "version": [1, 3],
                    "server_id": "s",
                    "host_id": "h",
                    "shm_dir": "",
                    "heartbeat_interval": 1,
                    "client_timeout": 5,
                    "max_message_bytes": 10,
                }
            )
        ]
    )
    assert msg.sources == [] and msg.heartbeat_interval == 1


# ---------------------------------------------------------------------- evolution rules
def test_unknown_extra_header_fields_are_ignored() -> None:
    fields = header_of(proto.Credit(3, 4, 5))
    fields["added_in_1_1"] = {"anything": [1, 2.5, b"x"]}
    fields["zzz"] = None
    msg, arrays = proto.decode([header(fields)])
    assert msg == proto.Credit(3, 4, 5)
    assert arrays == []


def test_unknown_fields_ignored_with_arrays_too() -> None:
    msg, arrays = SAMPLES["batch"]
    frames = wire(proto.encode(msg, arrays))
    fields = msgpack.unpackb(frames[0], raw=False)
    fields["future"] = 1
    got, got_arrays = proto.decode([header(fields), *frames[1:]])
    assert got == msg
    assert_same_array(got_arrays[0], arrays[0])


def test_unknown_message_type_raises_unknown_message() -> None:
    with pytest.raises(UnknownMessage, match="'teleport'"):
        proto.decode([header({"type": "teleport", "request_id": 1})])


@pytest.mark.parametrize("fields", [{"request_id": 1}, {"type": 7, "request_id": 1}, {"type": None}])
def test_missing_or_non_string_type_is_malformed(fields: dict[str, Any]) -> None:
    with pytest.raises(MalformedFrame, match="type"):
        proto.decode([header(fields)])


def _required_fields() -> list[tuple[str, str]]:
    out = []
    for name, cls in sorted(proto.MESSAGE_TYPES.items()):
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                out.append((name, f.name))
    return out


@pytest.mark.parametrize(("name", "field"), _required_fields())
def test_missing_required_field_is_malformed_and_named(name: str, field: str) -> None:
    msg, arrays = SAMPLES[name]
    frames = wire(proto.encode(msg, arrays))
    fields = msgpack.unpackb(frames[0], raw=False)
    del fields[field]
    with pytest.raises(MalformedFrame, match=f"missing required field '{field}'"):
        proto.decode([header(fields), *frames[1:]])


def _all_fields() -> list[tuple[str, str]]:
    return [
        (name, f.name) for name, cls in sorted(proto.MESSAGE_TYPES.items()) for f in dataclasses.fields(cls)
    ]


@pytest.mark.parametrize(("name", "field"), _all_fields())
def test_wrong_field_type_is_malformed_and_named(name: str, field: str) -> None:
    msg, arrays = SAMPLES[name]
    hint = typing.get_type_hints(type(msg))[field]
    wrong: Any = 12345 if hint is str else "not-the-right-type"
    frames = wire(proto.encode(msg, arrays))
    fields = msgpack.unpackb(frames[0], raw=False)
    fields[field] = wrong
    with pytest.raises(MalformedFrame, match=f"{name}.{field} should be"):
        proto.decode([header(fields), *frames[1:]])


@pytest.mark.parametrize(
    ("msg", "field", "value"),
    [
        (proto.Ack(1), "request_id", True),  # bool is not an int on the wire
        (proto.Credit(1, 1, 1), "batches", 1.0),  # nor is a float
        (SAMPLES["open_stream"][0], "include_indices", 1),  # an int is not a bool
        (proto.Goodbye(CLIENT_ID), "client_id", "0101"),  # str is not bytes
        (proto.Describe(1, {}), "source", [["name", "x"]]),
        (proto.Batch(1, 0, 0), "rng", []),
    ],
)
def test_specific_wrong_types(msg: Any, field: str, value: Any) -> None:
    fields = header_of(msg)
    fields[field] = value
    with pytest.raises(MalformedFrame, match=field):
        proto.decode([header(fields)])


def test_float_fields_accept_integers() -> None:
    fields = header_of(proto.Heartbeat(CLIENT_ID, 2.5))
    fields["sent_at"] = 2
    msg, _ = proto.decode([header(fields)])
    assert msg.sent_at == 2


def test_optional_fields_accept_none() -> None:
    msg, arrays = SAMPLES["open_stream"]
    assert msg.fields is None
    got, _ = proto.decode(wire(proto.encode(msg, arrays)))
    assert got.fields is None
    got, _ = proto.decode(wire(proto.encode(dataclasses.replace(msg, fields=["X"]), arrays)))
    assert got.fields == ["X"]


# ---------------------------------------------------------------------- malformed frames
def test_no_frames_is_malformed() -> None:
    with pytest.raises(MalformedFrame, match="0 frames"):
        proto.decode([])


@pytest.mark.parametrize("data", [b"\xc1", b"", b"\x92\x01", b"\x81\xa4type"])
def test_non_msgpack_header_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedFrame, match="msgpack"):
        proto.decode([data])


@pytest.mark.parametrize("value", [[1, 2], "ack", 7, None, b"ack"])
def test_non_map_header_is_malformed(value: Any) -> None:
    with pytest.raises(MalformedFrame, match="map"):
        proto.decode([header(value)])


def test_non_string_map_keys_are_malformed() -> None:
    with pytest.raises(MalformedFrame):
        proto.decode([msgpack.packb({1: "ack", "type": "ack", "request_id": 1})])


def test_frame_count_mismatch_is_malformed() -> None:
    msg, arrays = SAMPLES["batch"]
    frames = wire(proto.encode(msg, arrays))
    with pytest.raises(MalformedFrame, match="announces 2 array frames but 1 follow"):
        proto.decode(frames[:2])
    with pytest.raises(MalformedFrame, match="announces 2 array frames but 3 follow"):
        proto.decode([*frames, b""])
    with pytest.raises(MalformedFrame, match="announces 0 array frames but 1 follow"):
        proto.decode([proto.encode(proto.Ack(1))[0], b"\x00"])


@pytest.mark.parametrize("delta", [-1, 1, -8])
def test_wrong_array_byte_count_is_malformed(delta: int) -> None:
    frames = wire(proto.encode(proto.Ack(1), [np.zeros((2, 4), dtype="<f4")]))
    data = frames[1] + b"\x00" * delta if delta > 0 else frames[1][:delta]
    with pytest.raises(MalformedFrame, match="should hold 32 bytes"):
        proto.decode([frames[0], data])


@pytest.mark.parametrize(
    "spec",
    [
        "<f4",
        ["<f4"],
        ["<f4", [2], 0],
        ["<f4", 2],
        ["<f4", [-1]],
        ["<f4", [2.0]],
        ["<f4", [True]],
        ["<f4", [1] * 33],
    ],
)
def test_bad_array_spec_is_malformed(spec: Any) -> None:
    with pytest.raises(MalformedFrame):
        proto.decode([header({"type": "ack", "request_id": 1, "arrays": [spec]}), b"\x00" * 8])


@pytest.mark.parametrize("arrays_value", ["<f4", {"a": 1}, 3])
def test_arrays_entry_not_a_list_is_malformed(arrays_value: Any) -> None:
    with pytest.raises(MalformedFrame, match="'arrays'"):
        proto.decode([header({"type": "ack", "request_id": 1, "arrays": arrays_value})])


def test_too_many_arrays_is_rejected() -> None:
    arrays = [np.zeros(1, dtype="|u1")] * 3
    with pytest.raises(proto.FrameTooLarge, match="3 arrays exceed the limit of 2"):
        proto.decode(wire(proto.encode(proto.Ack(1), arrays)), Limits(max_arrays=2))
    assert len(roundtrip(arrays, Limits(max_arrays=3))) == 3


# ---------------------------------------------------------------------- dtypes
@pytest.mark.parametrize(
    "array",
    [
        np.array([object(), 1], dtype=object),
        np.array(["ab", "c"]),
        np.array([b"ab", b"c"]),
        np.zeros(2, dtype="V8"),
        np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
        np.zeros(2, dtype="datetime64[ns]"),
    ],
    ids=["object", "unicode", "bytes", "void", "structured", "datetime"],
)
def test_encoding_a_disallowed_dtype_raises_unsupported_dtype(array: np.ndarray[Any, Any]) -> None:
    with pytest.raises(UnsupportedDtype, match="cannot travel"):
        proto.encode(proto.Ack(1), [array])
    with pytest.raises(TypeError):  # UnsupportedDtype is also a TypeError
        proto.check_dtype(array.dtype)


@pytest.mark.parametrize(
    ("dtype_str", "nbytes"),
    [("|O8", 8), ("<U4", 16), ("|V8", 8), ("|S4", 4), ("<f4,<i4", 8), ("<M8[ns]", 8), ("<(2)i4", 8)],
    ids=["object", "unicode", "void", "bytes", "structured", "datetime", "subarray"],
)
def test_decoding_a_disallowed_dtype_raises_unsupported_dtype(dtype_str: str, nbytes: int) -> None:
    frames = [header({"type": "ack", "request_id": 1, "arrays": [[dtype_str, [1]]]}), b"\x00" * nbytes]
    with pytest.raises(UnsupportedDtype):
        proto.decode(frames)


@pytest.mark.parametrize("dtype_str", ["f4", "i8", "=f4", "f", "<", 4, None, "<u1", "<b1", "|i4"])
def test_dtype_without_explicit_byte_order_is_malformed(dtype_str: Any) -> None:
    frames = [header({"type": "ack", "request_id": 1, "arrays": [[dtype_str, [1]]]}), b"\x00" * 8]
    with pytest.raises(MalformedFrame):
        proto.decode(frames)


def test_allow_list() -> None:
    assert proto.ALLOWED_DTYPES == {
        "b1",
        "i1",
        "i2",
        "i4",
        "i8",
        "u1",
        "u2",
        "u4",
        "u8",
        "f2",
        "f4",
        "f8",
        "c8",
        "c16",
    }


@pytest.mark.parametrize("code", sorted(proto.ALLOWED_DTYPES))
@pytest.mark.parametrize("order", ["<", ">"])
def test_every_allowed_dtype_roundtrips_in_both_byte_orders(code: str, order: str) -> None:
    dtype = np.dtype(order + code)
    array = (np.arange(12) % 3 == 0) if code == "b1" else np.arange(12)
    array = array.astype(dtype).reshape(3, 4)
    (got,) = roundtrip([array])
    assert got.dtype == dtype
    assert got.dtype.str == dtype.str  # '|' for one-byte types, the given order otherwise
    np.testing.assert_array_equal(got, array)
    assert proto.dtype_from_wire(dtype.str) == dtype


def test_big_endian_arrays_keep_their_byte_order() -> None:
    array = np.array([1.5, -2.0, 1e300], dtype=">f8")
    frames = wire(proto.encode(proto.Ack(1), [array]))
    assert frames[1] == array.tobytes()  # no byte swapping on the wire
    assert msgpack.unpackb(frames[0])["arrays"] == [[">f8", [3]]]
    (got,) = proto.decode(frames)[1]
    assert got.dtype.str == ">f8"
    assert got.dtype.byteorder == ">"
    np.testing.assert_array_equal(got, array)
    ints = np.array([1, 256], dtype=">i4")
    assert_same_array(roundtrip([ints])[0], ints)


# ---------------------------------------------------------------------- limits
def test_oversized_header_raises_frame_too_large() -> None:
    frames = wire(proto.encode(SAMPLES["hello"][0]))
    limit = len(frames[0]) - 1
    with pytest.raises(FrameTooLarge, match=f"limit of {limit}"):
        proto.decode(frames, Limits(max_header_bytes=limit))
    proto.decode(frames, Limits(max_header_bytes=len(frames[0])))


def test_oversized_array_raises_frame_too_large() -> None:
    array = np.zeros(4, dtype="<f4")
    frames = wire(proto.encode(proto.Ack(1), [array]))
    with pytest.raises(FrameTooLarge, match="16 bytes exceeds the limit of 15"):
        proto.decode(frames, Limits(max_array_bytes=15))
    assert_same_array(proto.decode(frames, Limits(max_array_bytes=16))[1][0], array)


def test_announced_size_is_checked_before_the_frame() -> None:
    """A header announcing a huge array is refused without looking at (or allocating) it."""
    frames = [header({"type": "ack", "request_id": 1, "arrays": [["<f8", [1 << 40, 1 << 20]]]}), b""]
    with pytest.raises(FrameTooLarge):
        proto.decode(frames)


def test_limits_defaults() -> None:
    limits = Limits()
    assert limits.max_header_bytes == 1 << 20
    assert limits.max_array_bytes == 1 << 31
    assert limits.max_arrays == 1024


def test_error_hierarchy() -> None:
    for exc in (MalformedFrame, UnknownMessage, UnsupportedDtype, FrameTooLarge, proto.VersionMismatch):
        assert issubclass(exc, ProtocolError)
    assert issubclass(UnsupportedDtype, TypeError)
    assert issubclass(FrameTooLarge, ValueError)


# ---------------------------------------------------------------------- received arrays
def test_decoded_arrays_from_zmq_frames_are_writable_and_equal() -> None:
    arrays = [np.arange(12, dtype="<f4").reshape(3, 4), np.array([7, 8, 9], dtype=">i2")]
    frames = [zmq.Frame(b, copy=True) for b in wire(proto.encode(proto.Ack(1), arrays))]
    _, got = proto.decode(frames)
    for g, e in zip(got, arrays):
        assert_same_array(g, e)
        assert g.flags.writeable
        g[...] = 0  # batchup users normalise batches in place
        assert not g.any()


def test_decoded_arrays_from_bytearrays_are_writable_and_equal() -> None:
    array = np.arange(6, dtype="<i8").reshape(2, 3)
    frames = [bytearray(f) for f in wire(proto.encode(proto.Ack(1), [array]))]
    (got,) = proto.decode(frames)[1]
    assert_same_array(got, array)
    assert got.flags.writeable
    got *= 2
    np.testing.assert_array_equal(got, array * 2)


def test_decoding_does_not_copy_the_frame() -> None:
    array = np.arange(4, dtype="<i4")
    frames = [bytearray(f) for f in wire(proto.encode(proto.Ack(1), [array]))]
    (got,) = proto.decode(frames)[1]
    frames[1][0] = 42
    assert got[0] == 42


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(24, dtype="<f8").reshape(4, 6)[:, ::2],
        lambda: np.asfortranarray(np.arange(12, dtype="<i4").reshape(3, 4)),
        lambda: np.arange(24, dtype=">i8").reshape(2, 3, 4).transpose(2, 0, 1),
        lambda: np.arange(10, dtype="|u1")[::-1],
    ],
    ids=["strided", "fortran", "transposed-big-endian", "reversed"],
)
def test_non_contiguous_arrays_roundtrip(make: Any) -> None:
    array = make()
    assert not array.flags.c_contiguous
    (got,) = roundtrip([array])
    assert_same_array(got, array)
    assert got.flags.c_contiguous


@pytest.mark.parametrize(
    "array",
    [
        np.array(3.5),
        np.array(7, dtype=">i4"),
        np.array(True),
        np.zeros(0, dtype="<f4"),
        np.zeros((0, 3), dtype=">f8"),
        np.zeros((5, 0, 2), dtype="|u1"),
    ],
    ids=["0d-float", "0d-big-endian", "0d-bool", "empty", "empty-2d", "empty-middle"],
)
def test_zero_d_and_empty_arrays_roundtrip(array: np.ndarray[Any, Any]) -> None:
    frames = wire(proto.encode(proto.Ack(1), [array]))
    assert len(frames[1]) == array.nbytes
    (got,) = proto.decode(frames)[1]
    assert_same_array(got, array)
    assert got.flags.writeable


def test_scalars_and_lists_are_sent_as_arrays() -> None:
    (got,) = roundtrip([[1.0, 2.0]])
    assert_same_array(got, np.array([1.0, 2.0]))


# ---------------------------------------------------------------------- RNG state
def test_rng_state_roundtrip_with_a_random_state() -> None:
    rs = np.random.RandomState(2024)
    rs.permutation(100)
    rs.standard_normal()  # leaves a cached gaussian: has_gauss = 1
    state: Any = rs.get_state()
    assert state[3] == 1
    encoded = proto.encode_rng_state(state)  # type: ignore[arg-type]
    assert set(encoded) == {"kind", "key", "pos", "has_gauss", "gauss"}
    assert encoded["kind"] == "MT19937"
    assert isinstance(encoded["key"], bytes) and len(encoded["key"]) == 624 * 4
    assert encoded["key"] == np.asarray(state[1], dtype="<u4").tobytes()

    # through the wire, inside a message
    msg, _ = proto.decode(wire(proto.encode(proto.Reseed(1, 0, 1, encoded))))
    decoded = proto.decode_rng_state(msg.rng)
    assert proto.states_equal(decoded, state)
    other = np.random.RandomState()
    other.set_state(decoded)
    np.testing.assert_array_equal(other.permutation(50), rs.permutation(50))
    assert other.standard_normal() == rs.standard_normal()
    assert proto.states_equal(other.get_state(), rs.get_state())


def test_states_equal_detects_a_draw() -> None:
    rs = np.random.RandomState(1)
    before = rs.get_state()
    assert proto.states_equal(before, np.random.RandomState(1).get_state())
    rs.randint(10)
    assert not proto.states_equal(before, rs.get_state())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("key"),
        lambda s: s.update(kind="PCG64"),
        lambda s: s.update(key=s["key"][:-4]),
        lambda s: s.update(key="not bytes"),
        lambda s: s.update(pos=625),
        lambda s: s.update(pos=-1),
        lambda s: s.update(pos="0"),
        lambda s: s.update(gauss="x"),
    ],
    ids=["missing", "kind", "short-key", "key-type", "pos-high", "pos-low", "pos-type", "gauss"],
)
def test_bad_rng_state_is_malformed(mutate: Any) -> None:
    state = proto.encode_rng_state(np.random.RandomState(0).get_state())  # type: ignore[arg-type]
    mutate(state)
    with pytest.raises(MalformedFrame):
        proto.decode_rng_state(state)


@pytest.mark.parametrize("data", [None, [], "MT19937"])
def test_rng_state_of_wrong_type_is_malformed(data: Any) -> None:
    with pytest.raises(MalformedFrame):
        proto.decode_rng_state(data)


# ---------------------------------------------------------------------- versions
def test_protocol_version() -> None:
    assert proto.PROTOCOL_VERSION == (1, 6)


@pytest.mark.parametrize(
    ("peer", "ok"),
    [((1, 0), True), ((1, 1), True), ((1, 99), True), ((2, 0), False), ((0, 9), False)],
)
def test_same_major_is_compatible(peer: tuple[int, int], ok: bool) -> None:
    assert proto.is_compatible(peer) is ok


def test_hello_carries_the_version_as_a_list() -> None:
    msg, _ = proto.decode(wire(proto.encode(proto.Hello(list(proto.PROTOCOL_VERSION), CLIENT_ID, "ipc://x"))))
    assert msg.version == [1, 6]
    assert proto.is_compatible(tuple(msg.version))


# ---------------------------------------------------------------------- error codes
def test_error_codes_are_stable() -> None:
    assert {c.name: int(c) for c in proto.ErrorCode} == {
        "MALFORMED": 1,
        "VERSION_MISMATCH": 2,
        "UNKNOWN_SOURCE": 3,
        "INVALID_ARGUMENT": 4,
        "UNSUPPORTED_DTYPE": 5,
        "TOO_LARGE": 6,
        "UNKNOWN_STREAM": 7,
        "UNKNOWN_CLIENT": 8,
        "REMOTE_EXCEPTION": 9,
        "INTERNAL": 10,
        "UNAUTHORIZED": 11,
        "SHUTTING_DOWN": 12,
        "NOT_READY": 13,
        "UNAVAILABLE": 14,
    }


def test_error_code_travels_as_a_plain_integer() -> None:
    msg, _ = proto.decode(wire(proto.encode(proto.Error(proto.ErrorCode.TOO_LARGE, "big"))))
    assert msg.code == 6 and type(msg.code) is int
    assert proto.ErrorCode(msg.code) is proto.ErrorCode.TOO_LARGE


def test_msgpack_ext_types_are_not_field_values() -> None:
    """Headers are plain msgpack: an ext type (where a pickle would have to hide) is refused."""
    packed = msgpack.packb({"type": "describe", "request_id": 1, "source": msgpack.ExtType(1, b"x")})
    with pytest.raises(MalformedFrame, match="describe.source"):
        proto.decode([packed])


@pytest.mark.parametrize("text", ["<i4,(", "<i4,[", "|O", "<U3", "|V8"])
def test_hostile_dtype_strings_raise_protocol_errors(text: str) -> None:
    with pytest.raises(ProtocolError):
        proto.dtype_from_wire(text)


def test_arrays_decoded_from_bytes_are_writable_copies() -> None:
    frames = [bytes(f) for f in proto.encode(proto.Ack(1), [np.arange(4, dtype="<i4")])]
    original = frames[1]
    _, (arr,) = proto.decode(frames)
    arr[:] = 7
    assert frames[1] == original == np.arange(4, dtype="<i4").tobytes()
