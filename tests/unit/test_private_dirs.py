"""Private folders of servers and clients: removed by the next process to start once their
owner is gone, and no other folder, whatever its name."""

from __future__ import annotations

import os
import subprocess
import sys

from batchup_protocol.host import OWNER_FILE, make_private_dir, mark_owned, sweep_stale


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_marked_folders_of_gone_processes_are_removed(tmp_path):
    root = str(tmp_path)
    dead = _dead_pid()
    # a user's own folders with like names: never touched
    for name in (f"batchup-experiments-{dead}", f"batchup-{dead}-results", "batchup-2023"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.csv").write_text("important")
    (tmp_path / f"batchup-{dead}-file").write_text("a file, not a folder")
    left = tmp_path / f"batchup-{dead}-abcd"  # what a killed server left
    left.mkdir()
    (left / OWNER_FILE).write_text(f"{dead} 12345\n")
    (left / "pool-1.bin").write_bytes(b"x")
    reused = tmp_path / f"batchup-{os.getpid()}-reused"  # its pid now names another process
    reused.mkdir()
    (reused / OWNER_FILE).write_text(f"{os.getpid()} 1\n")
    mine = make_private_dir("batchup-", root)  # this live process's
    unreadable = tmp_path / f"batchup-{dead}-garbled"
    unreadable.mkdir()
    (unreadable / OWNER_FILE).write_text("not a pid")
    # made before owner files (or killed before writing one): only these exact names
    legacy = [tmp_path / n for n in (f"batchup-{dead}-0a1b2c3d", f"batchup-{dead}-0a1b2c3d-x4nj_5z9")]
    legacy += [tmp_path / f"batchup-client-{dead}-b6i000yr", tmp_path / f"batchup-local-{dead}-165y7njw"]
    for path in legacy:
        path.mkdir()
    alive = tmp_path / f"batchup-{os.getpid()}-0a1b2c3d"  # a live process's, not marked yet
    alive.mkdir()

    removed = sweep_stale(root)

    assert sorted(removed) == sorted([str(left), str(reused), *map(str, legacy)])
    assert alive.is_dir()
    assert os.path.isdir(mine) and os.path.isfile(os.path.join(mine, OWNER_FILE))
    for name in (f"batchup-experiments-{dead}", f"batchup-{dead}-results", "batchup-2023"):
        assert (tmp_path / name / "results.csv").read_text() == "important"
    assert (tmp_path / f"batchup-{dead}-file").exists() and unreadable.is_dir()


def test_a_marked_folder_names_this_process(tmp_path):
    path = make_private_dir("batchup-client-", str(tmp_path))
    assert os.path.basename(path).startswith(f"batchup-client-{os.getpid()}-")
    pid, start = open(os.path.join(path, OWNER_FILE)).read().split()
    assert int(pid) == os.getpid() and start.isdigit()
    other = tmp_path / "made-by-hand"
    other.mkdir()
    mark_owned(str(other))
    assert sweep_stale(str(tmp_path), "") == []  # its owner lives
