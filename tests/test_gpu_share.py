"""The lock that keeps memory-hungry GPU tests alone under pytest-xdist (``gpu_share.py``), checked with threads:
``flock`` locks belong to open files, so two threads of one process contend like two workers."""

import os
import threading

import pytest

from gpu_share import fcntl, gpu_lock

pytestmark = pytest.mark.skipif(fcntl is None, reason="flock is POSIX-only")


def _hold(directory, exclusive, entered, release):
    with gpu_lock("run", exclusive, directory):
        entered.set()
        release.wait(30)


def _start(directory, exclusive):
    entered, release = threading.Event(), threading.Event()
    thread = threading.Thread(target=_hold, args=(directory, exclusive, entered, release), daemon=True)
    thread.start()
    return thread, entered, release


def test_shared_holders_run_together_and_exclusive_waits_for_them(tmp_path):
    first = _start(tmp_path, False)
    second = _start(tmp_path, False)
    assert first[1].wait(10) and second[1].wait(10), "two shared holders must not exclude each other"
    alone = _start(tmp_path, True)
    assert not alone[1].wait(0.3), "the exclusive holder entered while shared ones held the lock"
    first[2].set()
    first[0].join(10)
    assert not alone[1].wait(0.3)
    second[2].set()
    second[0].join(10)
    assert alone[1].wait(10), "the exclusive holder never entered after the shared ones left"
    alone[2].set()
    alone[0].join(10)


def test_a_waiting_exclusive_holder_keeps_new_shared_ones_out(tmp_path):
    first = _start(tmp_path, False)
    assert first[1].wait(10)
    alone = _start(tmp_path, True)
    assert not alone[1].wait(0.3)
    late = _start(tmp_path, False)
    assert not late[1].wait(0.3), "a shared holder passed an exclusive one that was waiting"
    first[2].set()
    assert alone[1].wait(10)
    assert not late[1].wait(0.3), "a shared holder entered during the exclusive test"
    alone[2].set()
    assert late[1].wait(10)
    late[2].set()
    for thread in (first[0], alone[0], late[0]):
        thread.join(10)
    assert sorted(os.listdir(tmp_path)) == ["gate", "gpu"]
