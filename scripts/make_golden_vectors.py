#!/usr/bin/env python3
"""Write the protocol's golden vectors: one ``protocol/golden/<type>.bin`` per message type.

Each file is a msgpack array of ``bin`` objects, one per frame, holding the frames
exactly as :func:`batchup_protocol.encode` produces them (the header frame, then each
array's raw C-ordered bytes). See PROTOCOL.md, "Golden vectors".

Golden vectors are committed bytes. Tests decode and re-encode them and never
regenerate them; this script refuses to overwrite an existing file unless given
``--force``, which is only right when the protocol changed on purpose (a version bump,
see PROTOCOL.md, "Versioning and evolution").

Every value below is fixed: no randomness (the RNG states come from seeded legacy
``RandomState``s, whose streams numpy guarantees), no clock, no host names.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Any

import msgpack
import numpy as np

import batchup_protocol as proto
from batchup_protocol import ErrorCode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "protocol", "golden")

CLIENT_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
KEY_F4 = "sha256:d7200fb4c7bc4ec9f494392509a0204c5d5490873ed03fdc626728da47804ae1"  # arange(4) '<f4'
KEY_I8 = "sha256:541ac2fc4545d75d46d8bd325129c660807b7135edfb3c84eb6de9992860fc6f"  # arange(4) '<i8'
SHM_DIR = "/dev/shm/batchup-5e1f0c2a9b3d4e6f"
CODE_BYTES = b"\x80\x05\x95\x08\x00\x00\x00\x00\x00\x00\x00\x8c\x04fake\x94."  # stands for a cloudpickle
KEY_CODE = "sha256:" + hashlib.sha256(CODE_BYTES).hexdigest()


def _rng_state(seed: int, permute: int = 0) -> dict[str, Any]:
    """The wire RNG state of ``RandomState(seed)`` after ``permutation(permute)`` (if > 0)."""
    rs = np.random.RandomState(seed)
    if permute:
        rs.permutation(permute)
    return proto.encode_rng_state(rs.get_state())  # type: ignore[arg-type]


def golden_messages() -> dict[str, tuple[Any, list[np.ndarray[Any, Any]]]]:
    """One representative ``(message, arrays)`` per message type, keyed by type tag."""
    msgs: list[tuple[Any, list[np.ndarray[Any, Any]]]] = [
        (
            proto.Hello(
                [1, 1],
                CLIENT_ID,
                "tcp://10.0.0.2:40123",
                "trainer-1/0d6f3c1e-8a55-4b7e-9c1a-2f4e5d6c7b8a",
                "s3cret",
                4242,
            ),
            [],
        ),
        (
            proto.Welcome(
                [1, 1],
                "5e1f0c2a9b3d4e6f",
                "data-host/7c9e6679-7425-40de-944b-e07fc1f90ae7",
                SHM_DIR,
                1.0,
                30.0,
                1 << 30,
                ["demo", "mnist"],
            ),
            [],
        ),
        (proto.Describe(1, {"name": "mnist"}), []),
        (
            proto.SourceInfo(
                1,
                60000,
                [
                    {"name": "X", "dtype": "|u1", "shape": [28, 28]},
                    {"name": "y", "dtype": "<i8", "shape": []},
                ],
                {"name": "mnist", "split": "train"},
            ),
            [],
        ),
        (
            proto.OpenStream(
                2,
                1,
                {"name": "mnist"},
                {"kind": "subset", "repeats": 1, "indices": 0, "rng": _rng_state(12345)},
                4,
                True,
                8,
                1 << 28,
                ["X", "y"],
                True,
            ),
            [np.array([5, 3, 9, 0, 7, 1, 8, 2], dtype="<i4")],
        ),
        (proto.StreamOpened(2, 1, "/dev/shm/batchup-4242-0a1b2c3d/pool-00112233-1-7.bin", 8192, 6), []),
        (proto.Credit(1, 2, 2, [3, 0]), []),
        (proto.Reseed(1, 2, 1, _rng_state(7)), []),
        (proto.CloseStream(1), []),
        (
            proto.Batch(1, 0, 0, _rng_state(12345, permute=8)),
            [
                (np.arange(24) / 4).astype(">f4").reshape(4, 2, 3),
                np.array([3, 1, 4, 1], dtype="<i8"),
            ],
        ),
        (proto.EndOfStream(1, 2, 0), []),
        (proto.Gather(3, {"name": "mnist"}, ["y"]), [np.array([0, 59999, 17], dtype="<i8")]),
        (proto.GatherResult(3), [np.array([5, 9, 2], dtype="<i8")]),
        (proto.HaveArrays(4, [KEY_F4, KEY_I8]), []),
        (proto.ArraysPresent(4, [True, False]), []),
        (
            proto.RegisterArray(5, KEY_F4, SHM_DIR + "/" + KEY_F4.replace(":", "-") + ".npy"),
            [],
        ),
        (
            proto.UploadChunk(6, KEY_I8, "<i8", [4], 0),
            [np.arange(4, dtype="<i8").view(np.uint8)],
        ),
        (proto.Ack(6), []),
        (
            proto.Error(
                int(ErrorCode.REMOTE_EXCEPTION),
                "division by zero",
                0,
                1,
                5,
                "ZeroDivisionError",
                "Traceback (most recent call last):\n"
                '  File "augment.py", line 3, in augment\n'
                "ZeroDivisionError: division by zero\n",
                2,
            ),
            [],
        ),
        (proto.Heartbeat(CLIENT_ID, 1700000000.25), []),
        (proto.Goodbye(CLIENT_ID), []),
        (
            proto.RegisterCode(9, KEY_CODE, "__main__.augment"),
            [np.frombuffer(CODE_BYTES, dtype=np.uint8)],
        ),
    ]
    out = {msg.TYPE: (msg, arrays) for msg, arrays in msgs}
    missing = sorted(set(proto.MESSAGE_TYPES) - set(out))
    if missing:
        raise SystemExit(f"no golden message for type(s) {missing}; add one above")
    out.update(variants())
    return out


def variants() -> dict[str, tuple[Any, list[np.ndarray[Any, Any]]]]:
    """Further vectors for forms added by a minor version, as ``<type>.<what>``."""
    return {
        # (1.2) a standard dataset's split as a source reference
        "describe.dataset": (
            proto.Describe(
                2,
                {
                    "name": "cifar10",
                    "params": {"split": "val", "n_val": 5000, "val_lower": -1.0, "val_upper": 1.0},
                },
            ),
            [],
        ),
        # (1.2) a stream with a trusted client's function, then a plugin's named transform
        "open_stream.transforms": (
            proto.OpenStream(
                3,
                2,
                {"name": "cifar10", "params": {"split": "train"}},
                {"kind": "standard", "length": 40000, "repeats": -1, "rng": None},
                256,
                False,
                16,
                1 << 26,
                ["X", "y"],
                False,
                [{"code": KEY_CODE}, {"name": "crop_flip", "params": {"pad": 4}}],
                1234567890123,
            ),
            [],
        ),
        # (1.2) batchup's semi-supervised composite as one plan: a labelled subset repeating
        # forever beside an unlabelled source, both shuffled from one RNG
        "open_stream.composite": (
            proto.OpenStream(
                4,
                3,
                {
                    "composite": [
                        {"source": {"name": "mnist"}, "fields": ["X", "y"], "include_indices": False},
                        {"source": {"name": "unlabelled"}, "fields": None, "include_indices": True},
                    ]
                },
                {
                    "kind": "composite",
                    "trim": True,
                    "children": [
                        {"kind": "subset", "repeats": -1, "indices": 0},
                        {"kind": "standard", "length": 60000, "repeats": 1},
                    ],
                    "rng": _rng_state(5),
                },
                64,
                False,
                32,
                1 << 26,
            ),
            [np.array([0, 5, 9, 13], dtype="<i8")],
        ),
        # (1.2) an assigned stream (several servers): make batches 12, 14 and 15
        "credit.assign": (proto.Credit(3, 3, 11, [], [12, 14, 15]), []),
        # (1.4) an assigned stream on a server of the client's host, with a slot pool of 16
        "open_stream.assigned_shm": (
            proto.OpenStream(
                5,
                4,
                {"name": "train"},
                {"kind": "standard", "length": 50000, "repeats": 1, "rng": _rng_state(6)},
                256,
                False,
                16,
                1 << 26,
                None,
                True,
                [],
                0,
                True,
            ),
            [],
        ),
        # (1.4) a batch made again after its worker died, as frames, superseding slot 5
        "batch.again": (
            proto.Batch(2, 9, 0, None, -1, [], "", 5),
            [np.array([[0.25, -1.0]], dtype="<f4"), np.array([3], dtype="<i4")],
        ),
        # (1.5) a server that says how much batch credit it accepts
        "welcome.credit": (
            proto.Welcome(
                [1, 5],
                "5e1f0c2a9b3d4e6f",
                "data-host/7c9e6679-7425-40de-944b-e07fc1f90ae7",
                SHM_DIR,
                1.0,
                30.0,
                1 << 30,
                ["demo", "mnist"],
                True,
                ["crop_flip"],
                256,
            ),
            [],
        ),
        # (1.6) a stream opened ahead: 8 of its 32 batches of credit until it is taken over
        "open_stream.start_credit": (
            proto.OpenStream(
                7,
                9,
                {"name": "train"},
                {"kind": "standard", "length": 50000, "repeats": 1, "rng": _rng_state(6, permute=50000)},
                256,
                False,
                32,
                1 << 27,
                None,
                True,
                [],
                0,
                False,
                8,
            ),
            [],
        ),
        # (1.6) the end of a shuffled plan of 2 batches of a 6-row source, with the RNG
        # state it ends at (its one draw was the first batch's)
        "end_of_stream.final_rng": (proto.EndOfStream(1, 2, 0, None, _rng_state(12345, permute=6)), []),
        # (1.4) an assigned stream's freed slots handed back, granting nothing
        "credit.freed_assigned": (proto.Credit(4, 0, 20, [3, 0, 7]), []),
        # (1.2) a transformed batch whose function returned a list
        "batch.list": (
            proto.Batch(2, 5, 0, None, -1, [], "list"),
            [np.array([[0.5, 1.5]], dtype="<f4"), np.array([7], dtype="<i8")],
        ),
        # (1.2) the server is fetching the dataset
        "error.not_ready": (
            proto.Error(
                ErrorCode.NOT_READY, "the server is fetching cifar10 (converting); ask again shortly", 2
            ),
            [],
        ),
    }


def bundles() -> dict[str, list[tuple[Any, list[np.ndarray[Any, Any]]]]]:
    """(1.3) Data-socket messages carrying several messages back to back, keyed by name."""
    return {
        "batches": [
            (
                proto.Batch(stream_id=3, seq=8, generation=1, rng=None),
                [np.arange(6, dtype="<f4").reshape(2, 3), np.array([4, 5], dtype="<i8")],
            ),
            (
                proto.Batch(
                    stream_id=3,
                    seq=9,
                    generation=1,
                    rng=None,
                    slot=2,
                    layout=[["<f4", [2, 3], 0], ["<i8", [2], 64]],
                ),
                [],
            ),
            (proto.EndOfStream(stream_id=3, seq=10, generation=1, rng=None), []),
        ],
    }


def frame_bytes(frame: Any) -> bytes:
    """The bytes of one frame as it travels (arrays: their raw C-ordered buffer)."""
    if isinstance(frame, np.ndarray):
        return np.ascontiguousarray(frame).tobytes()
    return bytes(frame)


def golden_file(msg: Any, arrays: list[np.ndarray[Any, Any]]) -> bytes:
    """The content of a ``.bin`` file: a msgpack array of one ``bin`` per frame."""
    return bundle_file([(msg, arrays)])


def bundle_file(items: list[tuple[Any, list[np.ndarray[Any, Any]]]]) -> bytes:
    """A ``.bin`` file holding every frame of one message carrying ``items`` back to back."""
    frames = [frame_bytes(f) for f in proto.encode_bundle(items)]
    return msgpack.packb(frames, use_bin_type=True)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder to write into (default: %(default)s)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite existing files (only when the protocol changed on purpose)",
    )
    args = parser.parse_args(argv)
    contents = {name: golden_file(*item) for name, item in golden_messages().items()}
    contents.update({f"bundles/{name}": bundle_file(items) for name, items in bundles().items()})
    targets = {name: os.path.join(args.out, f"{name}.bin") for name in sorted(contents)}
    existing = [p for p in targets.values() if os.path.exists(p)]
    if existing and not args.force:
        missing = {n: p for n, p in targets.items() if not os.path.exists(p)}
        if not missing:
            print(f"all {len(targets)} golden vectors exist in {args.out}; nothing to write")
            return 0
        print(
            f"keeping {len(existing)} existing golden vector(s) (pass --force only for a "
            f"deliberate protocol change); writing the {len(missing)} new one(s)",
            file=sys.stderr,
        )
        targets = missing
    for name, path in targets.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = contents[name]
        with open(path, "wb") as f:
            f.write(data)
        print(f"wrote {path} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
