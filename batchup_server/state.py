"""What the router knows of its clients, their streams and its workers (plain records).

No sockets are opened or used here; the records only hold the ones the router made.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import zmq

from .sources import SourceSpec
from .streams import Stream, Task

__all__ = ["ClientState", "Job", "Pool", "StreamEntry", "WorkerHandle"]


@dataclasses.dataclass
class Pool:
    """A client's shared-memory slot pool; reused by its next stream of the same geometry,
    so its pages are not faulted in afresh every epoch."""

    path: str
    slots: int
    slot_bytes: int
    free: list[int]


@dataclasses.dataclass
class ClientState:
    client_id: bytes
    routing_id: bytes
    data_endpoint: str
    data: zmq.Socket[Any]
    last_seen: float
    streams: dict[int, StreamEntry] = dataclasses.field(default_factory=dict)
    idle_pools: list[Pool] = dataclasses.field(default_factory=list)
    bundles: bool = False  #: it decodes several batches in one data message (1.3)
    supersedes: bool = False  #: it frees the slot a batch made again names (1.4)
    pid: int = 0  #: its process, as its Hello says (names the temporary files it shares)
    #: a worker's time per batch of its last stream of each kind (:func:`cost_key`): the
    #: next stream of that kind (the next epoch) starts with task groups of that size
    costs: dict[tuple[Any, ...], float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StreamEntry:
    client: ClientState
    stream_id: int
    stream: Stream
    source: SourceSpec
    fields: list[int]
    include_indices: bool
    failed: bool = False
    slot_pool: Pool | None = None  #: shared-memory slots (None = batches go as frames)
    transforms: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    transform_seed: int = 0
    parts: list[tuple[SourceSpec, list[int], bool]] = dataclasses.field(default_factory=list)  #: composites
    job: Job | None = None  #: what its tasks carry (made at its first task)
    batch_s: float = 0.0  #: a worker's time per batch of it (moving average; 0 = not yet known)
    cost_key: tuple[Any, ...] = ()  #: where its cost is kept for the client's next such stream


@dataclasses.dataclass(frozen=True, eq=False)
class Job:
    """Where a task's result goes and what it gathers (a stream's batches, or a gather)."""

    client: ClientState
    stream_id: int
    source: SourceSpec
    fields: list[int]
    include_indices: bool
    gather: bool = False
    pool: str = ""
    slot_bytes: int = 0
    transforms: tuple[dict[str, Any], ...] = ()
    transform_seed: int = 0
    parts: tuple[tuple[SourceSpec, list[int], bool], ...] = ()

    @functools.cached_property
    def wire(self) -> dict[str, Any]:
        """The task header's fields common to every batch of the job (built once)."""
        header = {
            "op": "task",
            "endpoint": self.client.data_endpoint,
            "stream": self.stream_id,
            "source": self.source.to_wire(),
            "fields": self.fields,
            "include_indices": self.include_indices,
            "gather": self.gather,
            "pool": self.pool,
            "slot_bytes": self.slot_bytes,
            "bundle": self.client.bundles and not self.gather,
        }
        if self.transforms:
            header["transforms"] = list(self.transforms)
            header["transform_seed"] = self.transform_seed
        if self.parts:
            header["parts"] = [
                {"source": spec.to_wire(), "fields": f, "include_indices": inc} for spec, f, inc in self.parts
            ]
        return header


@dataclasses.dataclass
class WorkerHandle:
    index: int
    endpoint: str
    socket: zmq.Socket[Any]
    process: Any
    outstanding: dict[int, tuple[Job, list[Task]]] = dataclasses.field(default_factory=dict)
    ready: bool = False  #: the process connected and said so; before that a send could block
    code: set[str] = dataclasses.field(default_factory=set)  #: client functions it holds
