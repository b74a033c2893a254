"""Golden vectors: committed bytes that the codec must decode and re-encode unchanged.

Each ``protocol/golden/<type>.bin`` is a msgpack array of ``bin`` objects, one per
frame (PROTOCOL.md, "Golden vectors"). The expected messages are spelled out here, on
purpose independently of ``scripts/make_golden_vectors.py``. A failure here means the
wire format changed: fix the code, or make a deliberate, versioned protocol change.
Never regenerate the vectors to make this pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import batchup_protocol as proto
from batchup_protocol.host import content_key

GOLDEN = Path(proto.__file__).resolve().parent / "golden"

CLIENT_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
KEY_F4 = "sha256:d7200fb4c7bc4ec9f494392509a0204c5d5490873ed03fdc626728da47804ae1"
KEY_I8 = "sha256:541ac2fc4545d75d46d8bd325129c660807b7135edfb3c84eb6de9992860fc6f"
SHM_DIR = "/dev/shm/batchup-5e1f0c2a9b3d4e6f"


def rng_state(seed: int, permute: int = 0) -> dict[str, Any]:
    """The RNG map spelled out field by field (not via encode_rng_state)."""
    rs = np.random.RandomState(seed)
    if permute:
        rs.permutation(permute)
    _kind, key, pos, has_gauss, gauss = rs.get_state()
    return {
        "kind": "MT19937",
        "key": np.asarray(key, dtype="<u4").tobytes(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


CODE_BYTES = b"\x80\x05\x95\x08\x00\x00\x00\x00\x00\x00\x00\x8c\x04fake\x94."
KEY_CODE = "sha256:0fd4628513d285d6800daa1bf936061c3e55b6d80f1b215c41bdedcc9b70151d"

EXPECTED: dict[str, tuple[Any, list[np.ndarray[Any, Any]]]] = {
    "hello": (
        proto.Hello(
            version=[1, 1],
            client_id=CLIENT_ID,
            data_endpoint="tcp://10.0.0.2:40123",
            host_id="trainer-1/0d6f3c1e-8a55-4b7e-9c1a-2f4e5d6c7b8a",
            token="s3cret",
            pid=4242,
        ),
        [],
    ),
    "welcome": (
        proto.Welcome(
            version=[1, 1],
            server_id="5e1f0c2a9b3d4e6f",
            host_id="data-host/7c9e6679-7425-40de-944b-e07fc1f90ae7",
            shm_dir=SHM_DIR,
            heartbeat_interval=1.0,
            client_timeout=30.0,
            max_message_bytes=1073741824,
            sources=["demo", "mnist"],
        ),
        [],
    ),
    "describe": (proto.Describe(request_id=1, source={"name": "mnist"}), []),
    "source_info": (
        proto.SourceInfo(
            request_id=1,
            length=60000,
            fields=[
                {"name": "X", "dtype": "|u1", "shape": [28, 28]},
                {"name": "y", "dtype": "<i8", "shape": []},
            ],
            metadata={"name": "mnist", "split": "train"},
        ),
        [],
    ),
    "open_stream": (
        proto.OpenStream(
            request_id=2,
            stream_id=1,
            source={"name": "mnist"},
            plan={"kind": "subset", "repeats": 1, "indices": 0, "rng": rng_state(12345)},
            batch_size=4,
            include_indices=True,
            credit_batches=8,
            credit_bytes=268435456,
            fields=["X", "y"],
            shm=True,
        ),
        [np.array([5, 3, 9, 0, 7, 1, 8, 2], dtype="<i4")],
    ),
    "stream_opened": (
        proto.StreamOpened(
            request_id=2,
            stream_id=1,
            pool_path="/dev/shm/batchup-4242-0a1b2c3d/pool-00112233-1-7.bin",
            slot_bytes=8192,
            slots=6,
        ),
        [],
    ),
    "credit": (proto.Credit(stream_id=1, batches=2, consumed=2, freed=[3, 0]), []),
    "reseed": (proto.Reseed(stream_id=1, from_seq=2, generation=1, rng=rng_state(7)), []),
    "close_stream": (proto.CloseStream(stream_id=1), []),
    "batch": (
        proto.Batch(stream_id=1, seq=0, generation=0, rng=rng_state(12345, permute=8)),
        [
            np.array(
                [
                    [[0.0, 0.25, 0.5], [0.75, 1.0, 1.25]],
                    [[1.5, 1.75, 2.0], [2.25, 2.5, 2.75]],
                    [[3.0, 3.25, 3.5], [3.75, 4.0, 4.25]],
                    [[4.5, 4.75, 5.0], [5.25, 5.5, 5.75]],
                ],
                dtype=">f4",
            ),
            np.array([3, 1, 4, 1], dtype="<i8"),
        ],
    ),
    "end_of_stream": (proto.EndOfStream(stream_id=1, seq=2, generation=0, rng=None), []),
    "gather": (
        proto.Gather(request_id=3, source={"name": "mnist"}, fields=["y"]),
        [np.array([0, 59999, 17], dtype="<i8")],
    ),
    "gather_result": (proto.GatherResult(request_id=3), [np.array([5, 9, 2], dtype="<i8")]),
    "have_arrays": (proto.HaveArrays(request_id=4, keys=[KEY_F4, KEY_I8]), []),
    "arrays_present": (proto.ArraysPresent(request_id=4, present=[True, False]), []),
    "register_array": (
        proto.RegisterArray(
            request_id=5,
            key=KEY_F4,
            path=SHM_DIR + "/sha256-d7200fb4c7bc4ec9f494392509a0204c5d5490873ed03fdc626728da47804ae1.npy",
        ),
        [],
    ),
    "upload_chunk": (
        proto.UploadChunk(request_id=6, key=KEY_I8, dtype="<i8", shape=[4], offset=0),
        [np.array([0] * 8 + [1] + [0] * 7 + [2] + [0] * 7 + [3] + [0] * 7, dtype="|u1")],
    ),
    "ack": (proto.Ack(request_id=6), []),
    "error": (
        proto.Error(
            code=9,
            message="division by zero",
            request_id=0,
            stream_id=1,
            seq=5,
            remote_type="ZeroDivisionError",
            traceback=(
                "Traceback (most recent call last):\n"
                '  File "augment.py", line 3, in augment\n'
                "ZeroDivisionError: division by zero\n"
            ),
            generation=2,
        ),
        [],
    ),
    "heartbeat": (proto.Heartbeat(client_id=CLIENT_ID, sent_at=1700000000.25), []),
    "goodbye": (proto.Goodbye(client_id=CLIENT_ID), []),
    "register_code": (
        proto.RegisterCode(request_id=9, key=KEY_CODE, name="__main__.augment"),
        [np.frombuffer(CODE_BYTES, dtype=np.uint8)],
    ),
    # variants: forms added by minor versions
    "open_stream.transforms": (
        proto.OpenStream(
            request_id=3,
            stream_id=2,
            source={"name": "cifar10", "params": {"split": "train"}},
            plan={"kind": "standard", "length": 40000, "repeats": -1, "rng": None},
            batch_size=256,
            include_indices=False,
            credit_batches=16,
            credit_bytes=1 << 26,
            fields=["X", "y"],
            shm=False,
            transforms=[{"code": KEY_CODE}, {"name": "crop_flip", "params": {"pad": 4}}],
            transform_seed=1234567890123,
        ),
        [],
    ),
    "open_stream.composite": (
        proto.OpenStream(
            request_id=4,
            stream_id=3,
            source={
                "composite": [
                    {"source": {"name": "mnist"}, "fields": ["X", "y"], "include_indices": False},
                    {"source": {"name": "unlabelled"}, "fields": None, "include_indices": True},
                ]
            },
            plan={
                "kind": "composite",
                "trim": True,
                "children": [
                    {"kind": "subset", "repeats": -1, "indices": 0},
                    {"kind": "standard", "length": 60000, "repeats": 1},
                ],
                "rng": rng_state(5),
            },
            batch_size=64,
            include_indices=False,
            credit_batches=32,
            credit_bytes=1 << 26,
        ),
        [np.array([0, 5, 9, 13], dtype="<i8")],
    ),
    "credit.assign": (proto.Credit(stream_id=3, batches=3, consumed=11, assign=[12, 14, 15]), []),
    "open_stream.assigned_shm": (
        proto.OpenStream(
            request_id=5,
            stream_id=4,
            source={"name": "train"},
            plan={"kind": "standard", "length": 50000, "repeats": 1, "rng": rng_state(6)},
            batch_size=256,
            include_indices=False,
            credit_batches=16,
            credit_bytes=1 << 26,
            fields=None,
            shm=True,
            transforms=[],
            transform_seed=0,
            assigned=True,
        ),
        [],
    ),
    "credit.freed_assigned": (proto.Credit(stream_id=4, batches=0, consumed=20, freed=[3, 0, 7]), []),
    "welcome.credit": (
        proto.Welcome(
            version=[1, 5],
            server_id="5e1f0c2a9b3d4e6f",
            host_id="data-host/7c9e6679-7425-40de-944b-e07fc1f90ae7",
            shm_dir=SHM_DIR,
            heartbeat_interval=1.0,
            client_timeout=30.0,
            max_message_bytes=1073741824,
            sources=["demo", "mnist"],
            trusts_code=True,
            transforms=["crop_flip"],
            max_credit_batches=256,
        ),
        [],
    ),
    "open_stream.start_credit": (
        proto.OpenStream(
            request_id=7,
            stream_id=9,
            source={"name": "train"},
            plan={"kind": "standard", "length": 50000, "repeats": 1, "rng": rng_state(6, permute=50000)},
            batch_size=256,
            include_indices=False,
            credit_batches=32,
            credit_bytes=1 << 27,
            fields=None,
            shm=True,
            start_credit=8,
        ),
        [],
    ),
    "end_of_stream.final_rng": (
        proto.EndOfStream(stream_id=1, seq=2, generation=0, rng=None, final_rng=rng_state(12345, permute=6)),
        [],
    ),
    "batch.again": (
        proto.Batch(stream_id=2, seq=9, generation=0, supersedes=5),
        [np.array([[0.25, -1.0]], dtype="<f4"), np.array([3], dtype="<i4")],
    ),
    "batch.list": (
        proto.Batch(stream_id=2, seq=5, generation=0, container="list"),
        [np.array([[0.5, 1.5]], dtype="<f4"), np.array([7], dtype="<i8")],
    ),
    "describe.dataset": (
        proto.Describe(
            request_id=2,
            source={
                "name": "cifar10",
                "params": {"split": "val", "n_val": 5000, "val_lower": -1.0, "val_upper": 1.0},
            },
        ),
        [],
    ),
    "error.not_ready": (
        proto.Error(
            code=proto.ErrorCode.NOT_READY,
            message="the server is fetching cifar10 (converting); ask again shortly",
            request_id=2,
        ),
        [],
    ),
}
VARIANTS = {
    "describe.dataset",
    "error.not_ready",
    "open_stream.transforms",
    "batch.list",
    "credit.assign",
    "open_stream.composite",
    "open_stream.assigned_shm",
    "credit.freed_assigned",
    "batch.again",
    "welcome.credit",
    "end_of_stream.final_rng",
    "open_stream.start_credit",
}

GOLDEN_FILES = sorted(p.stem for p in GOLDEN.glob("*.bin"))


def read_frames(name: str) -> list[bytes]:
    data = (GOLDEN / f"{name}.bin").read_bytes()
    frames = msgpack.unpackb(data, raw=False)
    assert isinstance(frames, list) and all(isinstance(f, bytes) for f in frames)
    return frames


def frame_bytes(frame: Any) -> bytes:
    if isinstance(frame, np.ndarray):
        return np.ascontiguousarray(frame).tobytes()
    return bytes(frame)


def assert_arrays_equal(got: list[Any], expected: list[np.ndarray[Any, Any]]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert isinstance(g, np.ndarray)
        assert g.dtype.str == e.dtype.str
        assert g.shape == e.shape
        np.testing.assert_array_equal(g, e)


def test_every_message_type_has_a_golden_file() -> None:
    missing = sorted(set(proto.MESSAGE_TYPES) - set(GOLDEN_FILES))
    assert not missing, f"message type(s) without a golden vector: {missing}"


def test_every_golden_file_is_expected_here() -> None:
    assert sorted(EXPECTED) == GOLDEN_FILES
    assert set(EXPECTED) == set(proto.MESSAGE_TYPES) | VARIANTS


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_golden_decodes_to_expected(name: str) -> None:
    expected_msg, expected_arrays = EXPECTED[name]
    msg, arrays = proto.decode(read_frames(name))
    assert type(msg) is type(expected_msg)
    assert msg.TYPE == name.split(".")[0]
    assert msg == expected_msg
    assert_arrays_equal(arrays, expected_arrays)


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_golden_reencodes_to_identical_bytes(name: str) -> None:
    frames = read_frames(name)
    msg, arrays = proto.decode(frames)
    again = [frame_bytes(f) for f in proto.encode(msg, arrays)]
    assert again == frames
    data = (GOLDEN / f"{name}.bin").read_bytes()
    assert msgpack.packb(again, use_bin_type=True) == data


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_expected_message_encodes_to_golden_bytes(name: str) -> None:
    msg, arrays = EXPECTED[name]
    assert [frame_bytes(f) for f in proto.encode(msg, arrays)] == read_frames(name)


def test_golden_header_field_order() -> None:
    """type first, then fields in declaration order, then arrays."""
    header = msgpack.unpackb(read_frames("open_stream")[0], raw=False)
    assert list(header) == [
        "type",
        "request_id",
        "stream_id",
        "source",
        "plan",
        "batch_size",
        "include_indices",
        "credit_batches",
        "credit_bytes",
        "fields",
        "shm",
        "arrays",
    ]
    assert header["arrays"] == [["<i4", [8]]]
    assert list(msgpack.unpackb(read_frames("ack")[0], raw=False)) == ["type", "request_id"]


def test_golden_content_keys_match_their_arrays() -> None:
    assert content_key(np.arange(4, dtype="<f4")) == KEY_F4
    assert content_key(np.arange(4, dtype="<i8")) == KEY_I8
    chunk = EXPECTED["upload_chunk"][1][0]
    assert chunk.tobytes() == np.arange(4, dtype="<i8").tobytes()


def test_golden_rng_states_are_valid() -> None:
    for name in ("batch", "reseed"):
        msg, _ = proto.decode(read_frames(name))
        rs = np.random.RandomState()
        rs.set_state(proto.decode_rng_state(msg.rng))
    msg, _ = proto.decode(read_frames("open_stream"))
    state = proto.decode_rng_state(msg.plan["rng"])
    assert proto.states_equal(state, np.random.RandomState(12345).get_state())


def test_fields_added_by_a_minor_version_are_left_out_at_their_default() -> None:
    """A 1.2 peer that uses nothing new sends what a 1.1 peer sends (the golden bytes)."""
    header = msgpack.unpackb(read_frames("batch")[0], raw=False)
    assert "container" not in header
    header = msgpack.unpackb(read_frames("batch.list")[0], raw=False)
    assert header["container"] == "list"
    header = msgpack.unpackb(read_frames("open_stream.transforms")[0], raw=False)
    assert list(header)[-2:] == ["transforms", "transform_seed"]
    # (1.5) a Welcome from before 1.5 has no credit limit: the client reads the default, 64
    assert "max_credit_batches" not in msgpack.unpackb(read_frames("welcome")[0], raw=False)
    old, _ = proto.decode(read_frames("welcome"))
    assert old.max_credit_batches == 64
    header = msgpack.unpackb(read_frames("welcome.credit")[0], raw=False)
    assert list(header)[-1] == "max_credit_batches" and header["max_credit_batches"] == 256
    # (1.6) an end of stream from before 1.6 tells no final RNG state
    assert "final_rng" not in msgpack.unpackb(read_frames("end_of_stream")[0], raw=False)
    assert proto.decode(read_frames("end_of_stream"))[0].final_rng is None
    header = msgpack.unpackb(read_frames("end_of_stream.final_rng")[0], raw=False)
    assert list(header)[-1] == "final_rng" and header["rng"] is None
    assert proto.decode(read_frames("open_stream"))[0].start_credit == -1  # all of its credit
    header = msgpack.unpackb(read_frames("open_stream.start_credit")[0], raw=False)
    assert list(header)[-1] == "start_credit" and "assigned" not in header
