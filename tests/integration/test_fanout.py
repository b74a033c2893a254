"""Several servers feeding one trainer: batchup's batches in batchup's order, shared by
credits (a faster server does more), surviving a server killed mid-epoch."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import batchup.data_source as bds
import numpy as np
import pytest

import batchup_client
from tests.servers import RunningServer, wait_until, worker_pids, write_train_source

pytestmark = pytest.mark.integration

N = 900
X = np.random.RandomState(0).normal(size=(N, 6)).astype(np.float32)
Y = np.arange(N) % 10

PLUGIN = """
import os, time
import numpy as np
from batchup_server.plugins import transform

@transform("tag")
def tag(*batch):  # sleeps BU_DELAY seconds, says which process made the batch
    time.sleep(float(os.environ.get("BU_DELAY", "0")))  # noqa: sleep-ok (a slow server's work)
    return (*batch, np.full(len(batch[0]), os.getpid()))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("fan")
    (folder / "bu_fan_plugin.py").write_text(PLUGIN)
    server_toml = '[server]\nplugins = ["bu_fan_plugin"]\nheartbeat_interval = 0.5\nclient_timeout = 5.0\n'
    return folder, write_train_source(folder, X, Y, server_toml)


def _server(data: Any, delay: float = 0.0, bind: str = "tcp://127.0.0.1:0") -> RunningServer:
    folder, cfg = data
    env = dict(os.environ, BU_DELAY=str(delay))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    return RunningServer("--config", cfg, "--workers", "1", "--bind", bind, env=env)


def _reference(bs: int, seed: int, repeats: int = 1) -> list[Any]:
    ds = bds.ArrayDataSource([X, Y], repeats=repeats, include_indices=True)
    return list(ds.batch_iterator(bs, shuffle=np.random.RandomState(seed)))


def _same(got: list[Any], want: list[Any]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "socket"])
def test_two_servers_give_one_servers_batches_and_rng(data: Any, shm: bool) -> None:
    a, b = _server(data), _server(data)
    try:
        with batchup_client.connect([a.endpoint, b.endpoint]) as client:
            client.shared_memory_batches = shm  # servers on this host: slots, unless told not to
            assert client.info()["batch_transport"] == {
                a.endpoint: "shared memory" if shm else "tcp socket",
                b.endpoint: "shared memory" if shm else "tcp socket",
            }
            rng = np.random.RandomState(5)
            src = client.source("train", repeats=2, include_indices=True)
            got = []
            for i, batch in enumerate(src.batch_iterator(batch_size=32, shuffle=rng)):
                got.append(batch)
                if i == 7:
                    rng.uniform()  # the caller draws mid-epoch: the servers replan (RNG parity)
        want_rng = np.random.RandomState(5)
        want = []
        for i, batch in enumerate(
            bds.ArrayDataSource([X, Y], repeats=2, include_indices=True).batch_iterator(32, shuffle=want_rng)
        ):
            want.append(batch)
            if i == 7:
                want_rng.uniform()
        _same(got, want)
        assert rng.randint(1 << 30) == want_rng.randint(1 << 30)
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "socket"])
def test_a_training_loop_over_two_servers_takes_over_its_next_epochs(data: Any, shm: bool) -> None:
    """Protocol 1.6: each epoch's fanned-out stream is opened ahead, during the one before,
    and taken over when the caller's RNG is where batchup's would be."""
    a, b = _server(data), _server(data)
    try:
        with batchup_client.connect([a.endpoint, b.endpoint]) as client:
            client.shared_memory_batches = shm
            mine, ref = np.random.RandomState(9), np.random.RandomState(9)
            src = client.source("train", include_indices=True)
            ref_ds = bds.ArrayDataSource([X, Y], include_indices=True)
            for e in range(4):
                _same(
                    list(src.batch_iterator(batch_size=64, shuffle=mine)),
                    list(ref_ds.batch_iterator(64, shuffle=ref)),
                )
                if e == 2:
                    mine.uniform(), ref.uniform()  # the loop draws: epoch 4's stream is not taken
            assert mine.randint(1 << 30) == ref.randint(1 << 30)
            info = client.info()
            assert info["streams_taken_over"] == 1 and info["streams_ahead_closed"] == 1
            assert info["streams_ahead_open"] == 1
            client.close_ahead()
            assert client.info()["streams_ahead_open"] == 0
    finally:
        a.stop()
        b.stop()


def test_two_servers_on_this_host_keep_every_batch_the_user_keeps(data: Any) -> None:
    """Shared-memory slots with several servers: a user who keeps every batch (list(it))
    runs each server's pool dry; batches are then copied out of their slots, never
    blocking, and each kept batch stays as it was delivered."""
    a, b = _server(data), _server(data)
    try:
        with batchup_client.connect([a.endpoint, b.endpoint]) as client:
            src = client.source("train", repeats=3, include_indices=True)
            got = list(src.batch_iterator(batch_size=8, shuffle=np.random.RandomState(3)))
            info = client.info()
        assert set(info["batch_transport"].values()) == {"shared memory"}
        assert info["batches_copied_out"] > 0  # 338 batches kept, 16 slots a server
        _same(got, _reference(8, 3, repeats=3))
    finally:
        a.stop()
        b.stop()


def test_a_server_lost_while_the_others_slots_all_wait_for_its_batch(data: Any) -> None:
    """Shared memory, a slow server and a fast one: the fast one's slots fill with batches
    waiting for the slow one's earlier batch. When the slow one is killed, its batch goes to
    the fast one, which has no free slot: the waiting batches are copied out of their slots
    so it can make it, instead of everyone waiting for ever."""
    slow, fast = _server(data, delay=0.4), _server(data, delay=0.0)
    try:
        with batchup_client.connect([slow.endpoint, fast.endpoint], server_timeout=2.0) as client:
            src = client.source("train", include_indices=True, repeats=2).map("tag")
            it = src.batch_iterator(batch_size=4, shuffle=np.random.RandomState(6))
            got = [tuple(a.copy() for a in next(it)[:3]) for _ in range(3)]  # slots free again
            fast_conn = client._conns[fast.endpoint]  # which server holds what

            def fast_server_out_of_slots() -> bool:
                for conn in client._conns.values():
                    while conn.poll_data(0):  # file what came (the reader is not reading)
                        pass
                return any(fast_conn.short_of_slots(sid) for sid in list(fast_conn._inboxes))

            wait_until(fast_server_out_of_slots, timeout=30, what="the fast server to run out of slots")
            os.kill(slow.pid, signal.SIGKILL)
            got += [tuple(a.copy() for a in b[:3]) for b in it]
            info = client.info()
        assert info["batches_copied_out"] > 0  # the user kept no slot: these waited in one
        _same(got, _reference(4, 6, repeats=2))  # every batch once, in order
    finally:
        fast.stop()
        slow.kill()


def test_two_servers_are_sent_one_credit_every_few_batches(data: Any) -> None:
    """Shared memory, a reader that waits for two servers: each server hears once every few
    batches (the request carries the slots freed since), not once per batch. A wake-up for
    the other server's batch is not a wait in vain, and freed slots top a server's share up
    rather than go alone (0.66 messages a batch at CIFAR size before; 0.25 after)."""
    a, b = _server(data, delay=0.005), _server(data, delay=0.005)
    try:
        with batchup_client.connect([a.endpoint, b.endpoint]) as client:
            sent: list[tuple[int, int]] = []
            for conn in client._conns.values():
                assign = conn.assign

                def counted(
                    sid: int, seqs: list[int], consumed: int, freed: Any = (), _f: Any = assign
                ) -> None:
                    sent.append((len(seqs), len(freed)))
                    _f(sid, seqs, consumed, freed)

                conn.assign = counted  # type: ignore[method-assign]
            src = client.source("train", include_indices=True, repeats=2).map("tag")
            it = src.batch_iterator(batch_size=10, shuffle=np.random.RandomState(4))
            got = [tuple(a.copy() for a in g[:3]) for g in it]  # (slots free again)
            assert set(client.info()["batch_transport"].values()) == {"shared memory"}
        _same(got, _reference(10, 4, repeats=2))
        assert sum(n for n, _ in sent) > len(got)  # every batch, the end and a few past it
        assert len(sent) <= 0.35 * len(got), repr(sent)
    finally:
        a.stop()
        b.stop()


def test_a_faster_server_makes_more_batches(data: Any) -> None:
    slow, fast = _server(data, delay=0.03), _server(data, delay=0.0)
    try:
        with batchup_client.connect(f"{slow.endpoint},{fast.endpoint}") as client:
            src = client.source("train", include_indices=True).map("tag")
            got = list(src.batch_iterator(batch_size=10, shuffle=np.random.RandomState(1)))
        _same([g[:3] for g in got], [w for w in _reference(10, 1)])
        made_by = [int(g[3][0]) for g in got]
        by_slow = sum(p in worker_pids(slow.pid) for p in made_by)
        by_fast = sum(p in worker_pids(fast.pid) for p in made_by)
        assert by_slow + by_fast == len(got) == 90
        assert by_slow > 0 and by_fast > 2 * by_slow, (by_slow, by_fast)
    finally:
        slow.stop()
        fast.stop()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_server_killed_mid_epoch_costs_a_stall_not_a_batch(data: Any, sig: int) -> None:
    """Killed, or stopped (docker stop: its goodbye to each stream once failed the
    trainer's stream with "the server is shutting down" instead of replanning it)."""
    a, b = _server(data, delay=0.005), _server(data, delay=0.005)
    try:
        with batchup_client.connect([a.endpoint, b.endpoint], server_timeout=2.0) as client:
            src = client.source("train", include_indices=True).map("tag")
            got, gaps = [], []
            last = time.monotonic()
            for i, batch in enumerate(src.batch_iterator(batch_size=10, shuffle=np.random.RandomState(2))):
                now = time.monotonic()
                gaps.append(now - last)
                got.append(batch[:3])
                if i == 30:
                    os.kill(b.pid, sig)
                last = time.monotonic()
        _same(got, _reference(10, 2))  # every batch once, in order
        assert max(gaps) < 6.0  # detected within the heartbeat timeout (2 s), then replanned
    finally:
        a.stop()
        b.kill()


def test_a_server_that_comes_back_is_used_again(data: Any) -> None:
    a = _server(data)
    b = _server(data)
    bind = b.endpoint
    try:
        with batchup_client.connect([a.endpoint, bind], server_timeout=2.0) as client:
            os.kill(b.pid, signal.SIGKILL)
            b.kill()
            got = list(client.source("train").batch_iterator(batch_size=100))
            assert len(got) == 9  # served by a alone
            b = _server(data, bind=bind)
            wait_until(
                lambda: all(client.info()["servers"].values()) and len(client.info()["servers"]) == 2, 15
            )
            src = client.source("train", include_indices=True).map("tag")
            made_by = {
                int(g[3][0]) for g in src.batch_iterator(batch_size=10, shuffle=np.random.RandomState(3))
            }
            assert made_by & set(worker_pids(b.pid))  # the restarted server works again
    finally:
        a.stop()
        b.stop()


def test_a_server_that_comes_back_is_sent_the_clients_arrays_again(data: Any) -> None:
    """Client arrays on several servers: one restarted (its arrays gone with it) gets them
    again from the connection that replaced the lost one, and the epoch is whole."""
    a, b = _server(data), _server(data)
    bind = b.endpoint
    try:
        with batchup_client.connect([a.endpoint, bind], server_timeout=2.0) as client:
            src = client.array_source([X, Y], include_indices=True)
            assert len(list(src.batch_iterator(batch_size=100))) == 9
            old = client._conns[bind]
            b.stop()
            b = _server(data, bind=bind)

            def back() -> bool:
                return bool(client.info()["servers"][bind]) and client._conns[bind] is not old

            wait_until(back, 15, what="the server to be back")
            assert len(client._conns[bind]._held_keys) == 0  # a new connection, a new server
            got = list(src.batch_iterator(batch_size=10, shuffle=np.random.RandomState(2)))
            _same(got, _reference(10, 2))
            assert client._conns[bind]._held_keys  # sent there again
    finally:
        a.stop()
        b.stop()


def test_fanned_out_streams_shard_by_rank(data: Any) -> None:
    a, b = _server(data), _server(data)
    try:
        with batchup_client.connect([a.endpoint, b.endpoint]) as client:
            src = client.source("train", include_indices=True)
            ranks = [
                list(
                    src.batch_iterator(batch_size=16, shuffle=np.random.RandomState(8), rank=r, world_size=2)
                )
                for r in range(2)
            ]
        want = _reference(32, 8)
        assert len(ranks[0]) == len(ranks[1]) == len(want)
        for g, w in enumerate(want):
            np.testing.assert_array_equal(np.concatenate([ranks[0][g][0], ranks[1][g][0]]), w[0])
    finally:
        a.stop()
        b.stop()


def test_no_server_at_all_is_a_clear_error() -> None:
    with pytest.raises(batchup_client.ConnectionLost) as info:
        batchup_client.connect(["tcp://127.0.0.1:9", "tcp://127.0.0.1:7"], timeout=0.5)
    assert "tcp://127.0.0.1:9" in str(info.value) and "tcp://127.0.0.1:7" in str(info.value)


def test_a_server_killed_mid_epoch_of_a_sharded_slow_trainer(data: Any) -> None:
    """While a lost server goes unnoticed, the trainer's credit runs past the end of the
    epoch: batches asked past the end are answered once (by one end-of-stream), so they
    must not stay outstanding and starve the batches the lost server leaves to the other."""
    import threading

    a, b = _server(data), _server(data)
    try:
        with batchup_client.connect([a.endpoint, b.endpoint], server_timeout=2.0) as client:
            src = client.source("train", include_indices=True)
            got: list[Any] = []

            def run() -> None:
                rng = np.random.RandomState(4)
                for i, batch in enumerate(
                    src.batch_iterator(batch_size=4, shuffle=rng, rank=0, world_size=2)
                ):
                    got.append(batch)
                    if i == int(os.environ.get("KILL_AT", "75")):
                        os.kill(b.pid, signal.SIGKILL)
                    time.sleep(0.04)  # noqa: sleep-ok (the emulated training step)

            t = threading.Thread(target=run, daemon=True)
            t.start()
            t.join(40)
            assert not t.is_alive(), "the rank hangs after a server was killed"
        want = _reference(8, 4)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g[0], w[0][: len(g[0])])
            assert len(g[0]) == -(-len(w[0]) // 2)
    finally:
        a.stop()
        b.kill()


def test_a_server_that_comes_back_mid_epoch_makes_batches_of_the_open_stream(data: Any) -> None:
    a, b = _server(data, delay=0.01), _server(data, delay=0.01)
    bind = b.endpoint
    try:
        with batchup_client.connect([a.endpoint, bind], server_timeout=2.0) as client:
            src = client.source("train", include_indices=True, repeats=-1).map("tag")
            it = src.batch_iterator(batch_size=10, shuffle=np.random.RandomState(4))
            got = [next(it) for _ in range(10)]
            os.kill(b.pid, signal.SIGKILL)
            b.kill()
            b = _server(data, delay=0.01, bind=bind)
            back = set(worker_pids(b.pid))
            deadline = time.monotonic() + 60
            while not {int(g[3][0]) for g in got[-20:]} & back:  # the returned server's work
                assert time.monotonic() < deadline, "the returned server made no batch of the stream"
                got.append(next(it))
            for _ in range(20):  # and the stream goes on, shared again
                got.append(next(it))
            it.close()
        ref = bds.ArrayDataSource([X, Y], repeats=-1, include_indices=True).batch_iterator(
            10, shuffle=np.random.RandomState(4)
        )
        _same([g[:3] for g in got], [next(ref) for _ in got])  # every batch once, in order
    finally:
        a.stop()
        b.stop()


def test_servers_that_accept_little_credit_still_stream_everything(tmp_path: Any) -> None:
    """Two servers that accept at most 4 batches of credit (Welcome.max_credit_batches):
    the fanned-out stream asks each for no more and still gives batchup's batches."""
    cfg = write_train_source(tmp_path, X, Y, "[server]\nmax_credit_batches = 4\n")
    a = RunningServer("--config", cfg, "--workers", "1")
    b = RunningServer("--config", cfg, "--workers", "1")
    try:
        with batchup_client.connect([a.endpoint, b.endpoint]) as client:
            for shm in (True, False):
                client.shared_memory_batches = shm
                src = client.source("train", include_indices=True)
                _same(
                    list(src.batch_iterator(batch_size=32, shuffle=np.random.RandomState(6))),
                    _reference(32, 6),
                )
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("returns", [False, True], ids=["lost", "lost-and-back"])
def test_a_draw_after_a_server_was_lost_replans_the_batches_it_had_sent(data: Any, returns: bool) -> None:
    """A lost server's batches that arrived stay readable; but when the caller then draws
    from its RNG, those from the replanned batch on are void and nobody makes them again
    unless the client asks a live server for them (else: batches of the old plan, or a
    reader waiting for batches that never come)."""
    import threading

    a, b = _server(data), _server(data)
    bind = b.endpoint
    try:
        with batchup_client.connect([a.endpoint, bind], server_timeout=2.0) as client:
            warm = client.source("train").map("tag").batch_iterator(batch_size=10)
            made_by = {int(batch[2][0]) for batch in warm}  # both servers' workers are up
            assert made_by & set(worker_pids(a.pid)) and made_by & set(worker_pids(b.pid))
            src = client.source("train", include_indices=True, repeats=-1)
            rng = np.random.RandomState(6)
            it = src.batch_iterator(batch_size=100, shuffle=rng)  # 9 batches an epoch
            got = [next(it) for _ in range(3)]
            conn_b, sid_b = client._fans[max(client._fans)].streams[bind]

            def b_sent_past_the_epoch() -> bool:  # both servers fill their credit: 3..19 come
                while conn_b._recv_data(0):  # file what arrived, as a reader's wait does
                    pass
                return any(seq >= 9 for seq in conn_b._inboxes[sid_b]._items)

            wait_until(b_sent_past_the_epoch, what="server b's batches of the next epoch")
            got += [next(it) for _ in range(5)]
            os.kill(b.pid, signal.SIGKILL)
            b.kill()
            wait_until(lambda: not client.info()["servers"][bind], what="the loss noticed")
            got.append(next(it))  # batch 8; the stream drops the lost server, keeps its batches
            if returns:
                b = _server(data, bind=bind)
                wait_until(lambda: all(client.info()["servers"].values()), what="the server back")
            rng.uniform()  # the caller draws: epoch 2 (batch 9 on) is planned anew

            def run() -> None:
                for _ in range(27):
                    got.append(next(it))

            t = threading.Thread(target=run, daemon=True)
            t.start()
            t.join(30)
            assert not t.is_alive(), "the reader waits for batches nobody makes"
            it.close()
        ref_rng = np.random.RandomState(6)
        ref = bds.ArrayDataSource([X, Y], include_indices=True, repeats=-1).batch_iterator(
            100, shuffle=ref_rng
        )
        want = [next(ref) for _ in range(9)]
        ref_rng.uniform()
        want += [next(ref) for _ in range(27)]
        _same(got, want)
    finally:
        a.stop()
        b.kill()


@pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "socket"])
def test_a_server_lost_after_another_streams_wait_took_in_its_batches(data: Any, shm: bool) -> None:
    """Two streams read in turns: one's batches come in while the other waits. Then a
    server is lost. Its batches that came are read, not asked again of the other server:
    that server's copies came after their turn, were dropped (their shared-memory slots
    with them, unfreed) and stayed outstanding for ever, so it was asked for nothing more
    and the reader waited for ever."""
    import threading

    a, b = _server(data), _server(data)
    try:
        with batchup_client.connect([a.endpoint, b.endpoint], server_timeout=2.0) as client:
            client.shared_memory_batches = shm
            src = client.source("train", include_indices=True)
            it_b = src.batch_iterator(batch_size=10, shuffle=np.random.RandomState(2))
            got = [next(it_b)]  # each server is asked for its share of the first batches
            fan_b = max(client._fans)  # the stream of it_b
            conn_b, sid_b = client._fans[fan_b].streams[b.endpoint]
            it_a = src.batch_iterator(batch_size=10, shuffle=np.random.RandomState(1))
            for _ in range(40):  # its waits take in the first stream's batches too
                next(it_a)
                if len(conn_b._inboxes[sid_b]):
                    break
                time.sleep(0.05)  # noqa: sleep-ok (server b makes them meanwhile)
            assert len(conn_b._inboxes[sid_b]), "no batch of server b was taken in by the other stream"
            os.kill(b.pid, signal.SIGKILL)
            b.kill()
            wait_until(lambda: not client.info()["servers"][b.endpoint], what="the loss noticed")

            def run() -> None:
                got.extend(it_b)

            t = threading.Thread(target=run, daemon=True)
            t.start()
            t.join(40)
            assert not t.is_alive(), "the reader waits for batches nobody was asked for"
            it_a.close()
            _same(got, _reference(10, 2))
            # slots and credit all came back: a later stream on the one server left runs
            _same(
                list(src.batch_iterator(batch_size=10, shuffle=np.random.RandomState(3))), _reference(10, 3)
            )
    finally:
        a.stop()
        b.kill()
