"""The functions a stream may apply: who may register client code, and which transform
lists a stream may open with. Pure logic (the router only forwards the messages)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

import batchup_protocol as proto
from batchup_protocol import ErrorCode
from batchup_server.errors import RequestError
from batchup_server.functions import FunctionTable
from batchup_server.plugins import Registry, transform


@transform("unit_test_negate")
def _negate(*arrays: Any) -> tuple[Any, ...]:
    return tuple(-a for a in arrays)


PAYLOAD = b"pretend this is a cloudpickled function"
KEY = "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()


def _payload(data: bytes = PAYLOAD) -> list[Any]:
    return [np.frombuffer(data, np.uint8)]


def _error(call: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        call()
    return info.value


def test_a_trusting_local_server_keeps_code_by_its_key() -> None:
    table = FunctionTable(Registry(), True, "ipc:///tmp/x", curve=False)
    assert table.trusts
    table.register(proto.RegisterCode(1, KEY, "mod.fn"), _payload())
    assert table.code[KEY] == (PAYLOAD, "mod.fn")
    assert table.check([{"code": KEY}, {"name": "unit_test_negate", "params": {}}]) == [
        {"code": KEY},
        {"name": "unit_test_negate", "params": {}},
    ]


def test_code_is_refused_without_trust_and_the_refusal_says_how_to_map_instead() -> None:
    untrusting = FunctionTable(Registry(), False, "tcp://127.0.0.1:5555", curve=False)
    err = _error(lambda: untrusting.register(proto.RegisterCode(1, KEY, "mod.fn"), _payload()))
    assert err.code == ErrorCode.UNAUTHORIZED
    assert "--trust-client-code" in str(err) and "unit_test_negate" in str(err)
    anonymous = FunctionTable(Registry(), True, "tcp://0.0.0.0:5555", curve=False)  # --insecure
    assert not anonymous.trusts
    err = _error(lambda: anonymous.register(proto.RegisterCode(1, KEY, "mod.fn"), _payload()))
    assert err.code == ErrorCode.UNAUTHORIZED and "without CURVE authentication" in str(err)
    assert not untrusting.code and not anonymous.code  # nothing kept


def test_bad_registrations_are_typed_errors_and_keep_nothing() -> None:
    table = FunctionTable(Registry(), True, "ipc:///tmp/x", curve=False)
    err = _error(lambda: table.register(proto.RegisterCode(1, KEY), _payload(b"other bytes")))
    assert err.code == ErrorCode.INVALID_ARGUMENT and "do not match the key" in str(err)
    err = _error(lambda: table.register(proto.RegisterCode(1, KEY), [np.zeros(3, np.float32)]))
    assert err.code == ErrorCode.MALFORMED
    err = _error(lambda: table.register(proto.RegisterCode(1, KEY), []))
    assert err.code == ErrorCode.MALFORMED
    assert not table.code


@pytest.mark.parametrize(
    ("transforms", "want", "says"),
    [
        ({"name": "x"}, ErrorCode.MALFORMED, "list of maps"),
        ([{"code": "sha256:00"}], ErrorCode.INVALID_ARGUMENT, "no function registered"),
        (
            [{"name": "no_such_transform"}],
            ErrorCode.INVALID_ARGUMENT,
            "unknown transform 'no_such_transform'",
        ),
        ([{"name": "unit_test_negate", "params": [1]}], ErrorCode.MALFORMED, "params should be a map"),
        ([{"name": "unit_test_negate", "code": KEY}], ErrorCode.MALFORMED, "a transform is"),
    ],
)
def test_bad_transform_lists_are_typed_errors(transforms: Any, want: ErrorCode, says: str) -> None:
    table = FunctionTable(Registry(), True, "ipc:///tmp/x", curve=False)
    err = _error(lambda: table.check(transforms))
    assert err.code == want and says in str(err)
