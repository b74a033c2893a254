"""Every message of the wire protocol, defined once.

Each message is a frozen dataclass with a ``TYPE`` tag. On the wire a message is a
msgpack map ``{"type": TYPE, <field>: <value>, ...}`` (see PROTOCOL.md); arrays that
travel with a message are separate raw frames described by the header's ``arrays``
entry (see :mod:`batchup_protocol.framing`). Fields are only ever appended, with
defaults, so an older peer can skip what it does not know.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, ClassVar, Union

from .errors import MalformedFrame, UnknownMessage

__all__ = [
    "Ack",
    "ArraysPresent",
    "Batch",
    "CloseStream",
    "Credit",
    "Describe",
    "EndOfStream",
    "Error",
    "ErrorCode",
    "Gather",
    "GatherResult",
    "Goodbye",
    "HEARTBEAT_SUFFIX",
    "HaveArrays",
    "Heartbeat",
    "Hello",
    "MESSAGE_TYPES",
    "Message",
    "OpenStream",
    "RegisterArray",
    "RegisterCode",
    "Reseed",
    "SourceInfo",
    "StreamOpened",
    "UploadChunk",
    "Welcome",
    "message_from_fields",
]


def _since(version: tuple[int, int], default: Any = None, factory: Any = None) -> Any:
    """A field added in minor ``version``: encoders leave it out while it holds its default,
    so a message that uses nothing new is byte for byte what older peers send."""
    meta = {"since": version}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


#: a client's heartbeat socket has routing id ``client_id + HEARTBEAT_SUFFIX``
HEARTBEAT_SUFFIX = b"/heartbeat"


class ErrorCode(enum.IntEnum):
    """Error codes carried by :class:`Error`; never renumbered."""

    MALFORMED = 1  #: the request's frames could not be decoded
    VERSION_MISMATCH = 2  #: incompatible protocol major version
    UNKNOWN_SOURCE = 3  #: no source of that name / no array with that key
    INVALID_ARGUMENT = 4  #: a field has an illegal value (batch size, repeats...)
    UNSUPPORTED_DTYPE = 5  #: an array dtype outside the allow-list
    TOO_LARGE = 6  #: a message or batch above the size limits
    UNKNOWN_STREAM = 7  #: the stream id is not open for this client
    UNKNOWN_CLIENT = 8  #: a request before Hello, or from a reclaimed client
    REMOTE_EXCEPTION = 9  #: user/source code raised while preparing a batch
    INTERNAL = 10  #: a bug or resource failure in the server
    UNAUTHORIZED = 11  #: bad token / not allowed for this client
    SHUTTING_DOWN = 12  #: the server is stopping; open streams end with this error
    NOT_READY = 13  #: (1.2) the server is fetching the named dataset; ask again shortly
    UNAVAILABLE = 14  #: (1.2) the named dataset is not cached and cannot be fetched now


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """Client → server, first message on the control socket."""

    TYPE: ClassVar[str] = "hello"
    version: list[int]
    client_id: bytes
    data_endpoint: str
    host_id: str = ""
    token: str = ""
    pid: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Welcome:
    """Server → client, answer to :class:`Hello`."""

    TYPE: ClassVar[str] = "welcome"
    version: list[int]
    server_id: str
    host_id: str
    shm_dir: str
    heartbeat_interval: float
    client_timeout: float
    max_message_bytes: int
    sources: list[str] = dataclasses.field(default_factory=list)
    trusts_code: bool = _since((1, 2), False)  #: (1.2) the server runs functions clients ship (RegisterCode)
    transforms: list[str] = _since((1, 2), factory=list)  #: (1.2) named transforms (plugins)
    #: (1.5) the largest ``OpenStream.credit_batches`` it accepts (absent: 64, the default before 1.5)
    max_credit_batches: int = _since((1, 5), 64)


@dataclasses.dataclass(frozen=True, slots=True)
class Describe:
    """Client → server: length, fields and metadata of a source."""

    TYPE: ClassVar[str] = "describe"
    request_id: int
    source: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class SourceInfo:
    """Server → client, answer to :class:`Describe`."""

    TYPE: ClassVar[str] = "source_info"
    request_id: int
    length: int
    fields: list[dict[str, Any]]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class OpenStream:
    """Client → server: start streaming batches of a plan (subset indices as array 0)."""

    TYPE: ClassVar[str] = "open_stream"
    request_id: int
    stream_id: int
    source: dict[str, Any]
    plan: dict[str, Any]
    batch_size: int
    include_indices: bool
    credit_batches: int
    credit_bytes: int
    fields: list[str] | None = None
    shm: bool = False  #: (1.1) deliver batches through a shared-memory slot pool if possible
    transforms: list[dict[str, Any]] = _since((1, 2), factory=list)  #: (1.2) maps, innermost first
    transform_seed: int = _since((1, 2), 0)  #: (1.2) seeds the RNGs transforms draw from, per batch
    assigned: bool = _since((1, 2), False)  #: (1.2) make only the batches Credit.assign names
    #: (1.6) batches the server may make before the client's first Credit (-1: all of
    #: credit_batches); the window, and a slot pool, are still sized by credit_batches
    start_credit: int = _since((1, 6), -1)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamOpened:
    """Server → client, answer to :class:`OpenStream`."""

    TYPE: ClassVar[str] = "stream_opened"
    request_id: int
    stream_id: int
    pool_path: str = ""  #: (1.1) the slot pool file; "" = batches come as frames
    slot_bytes: int = 0  #: (1.1) bytes per slot (a multiple of 4096)
    slots: int = 0  #: (1.1) number of slots in the pool


@dataclasses.dataclass(frozen=True, slots=True)
class Credit:
    """Client → server: ``batches`` more may be in flight; ``consumed`` batches are done."""

    TYPE: ClassVar[str] = "credit"
    stream_id: int
    batches: int
    consumed: int
    freed: list[int] = dataclasses.field(default_factory=list)  #: (1.1) pool slots free again
    assign: list[int] = _since((1, 2), factory=list)  #: (1.2) assigned streams: make these batches


@dataclasses.dataclass(frozen=True, slots=True)
class Reseed:
    """Client → server: replan from ``from_seq`` with the caller's current RNG state."""

    TYPE: ClassVar[str] = "reseed"
    stream_id: int
    from_seq: int
    generation: int
    rng: dict[str, Any] | None


@dataclasses.dataclass(frozen=True, slots=True)
class CloseStream:
    """Client → server: stop a stream and free its credits."""

    TYPE: ClassVar[str] = "close_stream"
    stream_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """Server → client data socket: one mini-batch; its arrays follow as raw frames."""

    TYPE: ClassVar[str] = "batch"
    stream_id: int
    seq: int
    generation: int
    rng: dict[str, Any] | None = None
    slot: int = -1  #: (1.1) >= 0: the arrays are in this pool slot, not in frames
    layout: list[Any] = dataclasses.field(default_factory=list)  #: (1.1) [dtype, shape, offset] per array
    container: str = _since(
        (1, 2), ""
    )  #: (1.2) a transform's result: "" tuple, "list", "array" (one), "none"
    #: (1.4) a batch made again after its worker died, as frames: the slot its first making
    #: was given (the client frees it if that one never came); -1 otherwise
    supersedes: int = _since((1, 4), -1)


@dataclasses.dataclass(frozen=True, slots=True)
class EndOfStream:
    """Server → client data socket: the plan has ``seq`` batches and no more."""

    TYPE: ClassVar[str] = "end_of_stream"
    stream_id: int
    seq: int
    generation: int
    rng: dict[str, Any] | None = None
    #: (1.6) the plan's RNG state after its last batch, whenever the plan has an RNG (the
    #: state the caller's RNG reaches once the stream is read): the next epoch's stream
    #: can start from it before this one is read to the end
    final_rng: dict[str, Any] | None = _since((1, 6), None)


@dataclasses.dataclass(frozen=True, slots=True)
class Gather:
    """Client → server: rows of a source by absolute index (indices as array 0)."""

    TYPE: ClassVar[str] = "gather"
    request_id: int
    source: dict[str, Any]
    fields: list[str] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class GatherResult:
    """Server → client, answer to :class:`Gather`; one array per field."""

    TYPE: ClassVar[str] = "gather_result"
    request_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class HaveArrays:
    """Client → server: which of these content keys does the server already hold?"""

    TYPE: ClassVar[str] = "have_arrays"
    request_id: int
    keys: list[str]


@dataclasses.dataclass(frozen=True, slots=True)
class ArraysPresent:
    """Server → client, answer to :class:`HaveArrays`."""

    TYPE: ClassVar[str] = "arrays_present"
    request_id: int
    present: list[bool]


@dataclasses.dataclass(frozen=True, slots=True)
class RegisterArray:
    """Client → server (same host): an ``.npy`` file the client wrote into ``shm_dir``."""

    TYPE: ClassVar[str] = "register_array"
    request_id: int
    key: str
    path: str


@dataclasses.dataclass(frozen=True, slots=True)
class RegisterCode:
    """(1.2) Client → server: a function for ``map``, pickled by cloudpickle, as array 0
    (uint8); ``key`` is ``"sha256:<hex>"`` of those bytes. Only a server that trusts the
    client's code accepts it; no other server unpickles it."""

    TYPE: ClassVar[str] = "register_code"
    request_id: int
    key: str
    name: str = ""  #: the function's qualified name, for logs and errors


@dataclasses.dataclass(frozen=True, slots=True)
class UploadChunk:
    """Client → server: bytes ``[offset, offset+len)`` of an array (chunk as array 0)."""

    TYPE: ClassVar[str] = "upload_chunk"
    request_id: int
    key: str
    dtype: str
    shape: list[int]
    offset: int


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    """Server → client: the request succeeded and has nothing else to say."""

    TYPE: ClassVar[str] = "ack"
    request_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Error:
    """Either direction: a request or a stream failed."""

    TYPE: ClassVar[str] = "error"
    code: int
    message: str
    request_id: int = 0
    stream_id: int = 0
    seq: int = -1
    remote_type: str = ""
    traceback: str = ""
    generation: int = -1  #: plan generation of a batch error; -1: not tied to one


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """Either direction on the heartbeat socket: I am alive."""

    TYPE: ClassVar[str] = "heartbeat"
    client_id: bytes
    sent_at: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Goodbye:
    """Client → server: reclaim everything this client holds now."""

    TYPE: ClassVar[str] = "goodbye"
    client_id: bytes


Message = Union[  # noqa: UP007 (typing.get_args enumerates the members)
    Hello, Welcome, Describe, SourceInfo, OpenStream, StreamOpened, Credit, Reseed,
    CloseStream, Batch, EndOfStream, Gather, GatherResult, HaveArrays, ArraysPresent,
    RegisterArray, UploadChunk, Ack, Error, Heartbeat, Goodbye, RegisterCode,
]  # fmt: skip

MESSAGE_TYPES: dict[str, type[Any]] = {cls.TYPE: cls for cls in typing.get_args(Message)}

_HINTS: dict[type[Any], dict[str, Any]] = {cls: typing.get_type_hints(cls) for cls in MESSAGE_TYPES.values()}


def _accepted_types(hint: Any) -> tuple[tuple[type[Any], ...], bool]:
    """``isinstance`` types a hint admits, and whether ``bool`` must be refused (int/float)."""
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        parts = [_accepted_types(h) for h in typing.get_args(hint)]
        return tuple(t for p in parts for t in p[0]), any(p[1] for p in parts)
    if hint is type(None):
        return (type(None),), False
    if hint is int:
        return (int,), True
    if hint is float:
        return (int, float), True
    if hint is Any:
        return (object,), False
    return ((origin if origin is not None else hint),), False


#: per message class: (field name, accepted types, refuse bool, required) in declaration order
_SCHEMA: dict[type[Any], tuple[tuple[str, tuple[type[Any], ...], bool, bool], ...]] = {
    cls: tuple(
        (
            f.name,
            *_accepted_types(_HINTS[cls][f.name]),
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )
    for cls in MESSAGE_TYPES.values()
}


def message_from_fields(fields: dict[str, Any]) -> Any:
    """Build the message named by ``fields["type"]``, checking every field's type.

    Unknown fields are skipped (a newer peer may have added them); a missing required
    field or a value of the wrong type raises :class:`MalformedFrame` naming it.
    """
    name = fields.get("type")
    if not isinstance(name, str):
        raise MalformedFrame(f"header has no string 'type' field, got {name!r}")
    cls = MESSAGE_TYPES.get(name)
    if cls is None:
        raise UnknownMessage(f"unknown message type {name!r}")
    kwargs: dict[str, Any] = {}
    for field, accepted, no_bool, required in _SCHEMA[cls]:
        if field in fields:
            value = fields[field]
            if not isinstance(value, accepted) or (no_bool and value.__class__ is bool):
                raise MalformedFrame(
                    f"{name}.{field} should be {_HINTS[cls][field]}, but got {type(value).__name__} {value!r:.80}"
                )
            kwargs[field] = value
        elif required:
            raise MalformedFrame(f"{name} is missing required field {field!r}")
    return cls(**kwargs)
