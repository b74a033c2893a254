"""Bundles (protocol 1.3): several messages back to back in one data-socket message."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest

import batchup_protocol as proto
from batchup_protocol import FrameTooLarge, MalformedFrame

GOLDEN_BUNDLE = Path(proto.__file__).resolve().parent / "golden" / "bundles" / "batches.bin"

# Spelled out independently of scripts/make_golden_vectors.py.
EXPECTED = [
    (
        proto.Batch(stream_id=3, seq=8, generation=1),
        [np.arange(6, dtype="<f4").reshape(2, 3), np.array([4, 5], dtype="<i8")],
    ),
    (
        proto.Batch(stream_id=3, seq=9, generation=1, slot=2, layout=[["<f4", [2, 3], 0], ["<i8", [2], 64]]),
        [],
    ),
    (proto.EndOfStream(stream_id=3, seq=10, generation=1), []),
]


def golden_frames() -> list[bytes]:
    frames = msgpack.unpackb(GOLDEN_BUNDLE.read_bytes(), raw=False)
    assert isinstance(frames, list) and all(isinstance(f, bytes) for f in frames)
    return frames


def test_golden_bundle_decodes_to_its_messages_in_order() -> None:
    items = proto.decode_bundle(golden_frames())
    assert [msg for msg, _ in items] == [msg for msg, _ in EXPECTED]
    for (_, got), (_, want) in zip(items, EXPECTED, strict=True):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.dtype.str == w.dtype.str and g.shape == w.shape
            np.testing.assert_array_equal(g, w)


def test_golden_bundle_reencodes_to_identical_frames() -> None:
    frames = golden_frames()
    again = [
        bytes(f) if not isinstance(f, np.ndarray) else f.tobytes() for f in proto.encode_bundle(EXPECTED)
    ]
    assert again == frames
    assert len(frames) == 5  # three headers and the first batch's two array frames


def test_a_single_message_is_a_bundle_of_one() -> None:
    msg, arrays = EXPECTED[0]
    items = proto.decode_bundle(proto.encode(msg, arrays))
    assert len(items) == 1 and items[0][0] == msg
    np.testing.assert_array_equal(items[0][1][0], arrays[0])


def test_decode_refuses_a_bundle() -> None:
    """A 1.2 peer's ``decode`` sees a bundle as a header with too many frames."""
    with pytest.raises(MalformedFrame, match="announces 2 array frames but 4 follow"):
        proto.decode(golden_frames())


def test_a_bundle_cut_short_names_what_is_missing() -> None:
    frames = golden_frames()[:2]  # the first header announces two arrays; one follows
    with pytest.raises(MalformedFrame, match="announces 2 array frames but 1 follow"):
        proto.decode_bundle(frames)


def test_a_bundle_with_a_garbage_second_header_is_malformed() -> None:
    frames = golden_frames()[:3] + [b"\xc1 not msgpack"]
    with pytest.raises(MalformedFrame, match="not a msgpack map"):
        proto.decode_bundle(frames)


def test_empty_and_oversized_bundles_are_refused() -> None:
    with pytest.raises(MalformedFrame):
        proto.decode_bundle([])
    one = proto.encode(proto.EndOfStream(1, 0, 0))
    limits = proto.Limits(max_bundle=3)
    assert len(proto.decode_bundle(one * 3, limits)) == 3
    with pytest.raises(FrameTooLarge, match="more than 3"):
        proto.decode_bundle(one * 4, limits)


@pytest.mark.parametrize(
    ("peer", "ok"), [([1, 3], True), ([1, 9], True), ([1, 2], False), ([1], False), ("x", False)]
)
def test_bundles_only_for_clients_that_know_them(peer: object, ok: bool) -> None:
    assert proto.takes_bundles(peer) is ok


def test_cheap_batches_are_held_for_bundle_wait_and_slow_ones_for_one_and_a_half_batches() -> None:
    from batchup_server.scheduling import BUNDLE_WAIT_S, bundle_hold

    assert bundle_hold(0.0, 0) == BUNDLE_WAIT_S
    assert bundle_hold(5 * 0.0004, 5) == BUNDLE_WAIT_S  # 0.4 ms batches: several in 2 ms
    assert bundle_hold(2 * 0.005, 2) == pytest.approx(0.0075)  # 5 ms batches: 1.5 of them


def test_group_size_follows_the_measured_cost_of_a_batch() -> None:
    from batchup_server.scheduling import GROUP, group_size

    assert group_size(0.0) == 1  # not measured yet: one batch per task
    assert group_size(0.0003) == GROUP  # cheap batches: capped
    assert group_size(0.0055) == 4  # a 5.5 ms augmentation: about 25 ms of work per task
    assert group_size(0.05) == 1
