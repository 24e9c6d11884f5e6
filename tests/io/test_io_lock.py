"""Advisory file locks: shared locks coexist, exclusive ones exclude, release frees."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kidneyreg.io.lock import LOCKING_AVAILABLE, FileLock

pytestmark = pytest.mark.skipif(not LOCKING_AVAILABLE, reason="no flock on this platform")


def _acquire_in_background(lock: FileLock) -> tuple[threading.Thread, threading.Event]:
    """Start a thread that waits for ``lock``; the event is set once it holds it."""
    got = threading.Event()

    def wait_for_it() -> None:
        lock.acquire()
        got.set()

    thread = threading.Thread(target=wait_for_it)
    thread.start()
    return thread, got


def test_shared_locks_coexist_and_exclude_an_exclusive_one(tmp_path: Path) -> None:
    path = tmp_path / "work.lock"
    first, second = FileLock(path, shared=True), FileLock(path, shared=True)
    assert first.acquire(blocking=False) and second.acquire(blocking=False)
    exclusive = FileLock(path)
    assert not exclusive.acquire(blocking=False)
    assert not exclusive.held
    first.release()
    assert not exclusive.acquire(blocking=False)  # the second reader still holds it
    second.release()
    assert exclusive.acquire(blocking=False)
    assert not FileLock(path, shared=True).acquire(blocking=False)
    exclusive.release()
    exclusive.release()  # releasing twice is harmless


def test_lock_held_by_another_process_blocks_until_it_ends(tmp_path: Path) -> None:
    path = tmp_path / "fold.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from kidneyreg.io.lock import FileLock; "
            f"lock = FileLock({str(path)!r}); lock.acquire(); print('held', flush=True); "
            "sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waiter = FileLock(path)
        assert not waiter.acquire(blocking=False)
        thread, got = _acquire_in_background(waiter)
        time.sleep(0.2)
        assert not got.is_set()
        assert holder.stdin is not None
        holder.stdin.close()  # the holder ends; its lock goes with it
        thread.join(timeout=30)
        assert got.is_set()
        waiter.release()
    finally:
        holder.kill()
        holder.wait()


def test_acquiring_twice_on_one_object_is_an_error(tmp_path: Path) -> None:
    with FileLock(tmp_path / "x.lock") as lock, pytest.raises(RuntimeError, match="already held"):
        lock.acquire()


def test_a_waiter_on_a_removed_lock_file_locks_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "setup.lock"
    first = FileLock(path)
    first.acquire()
    waiter = FileLock(path)
    thread, got = _acquire_in_background(waiter)
    time.sleep(0.2)
    # The holder tidies up; a newcomer locks the path afresh before the waiter wakes up.
    newcomer = FileLock(path)
    first.release(remove=True)
    assert newcomer.acquire(blocking=False) or got.wait(timeout=5)
    if newcomer.held:
        # Both must not hold it: the waiter saw its file was removed and now waits on the new one.
        time.sleep(0.2)
        assert not got.is_set()
        newcomer.release()
    thread.join(timeout=30)
    assert got.is_set() and waiter.held and path.is_file()
    waiter.release(remove=True)
    assert not path.exists()
