"""Advisory file locks, so that processes sharing a work folder do not undo each other's work.

Several processes may share one benchmark work folder (one per core or machine, sharing its
pretrainings and held-out cases). The locks here keep them apart where they would collide:
simulating the same cohort at once, running the same pretraining or registering the same case
twice, or emptying a folder another process is still using. They are
advisory ``flock`` locks (POSIX): held on an open file, released when it is closed or the process
dies, so a killed process never leaves a stale lock behind. On platforms without ``fcntl``
(Windows) they do nothing, and the processes must be started as the documentation describes.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "work.lock"
    >>> with FileLock(path, shared=True) as first, FileLock(path, shared=True) as second:
    ...     print(first.held, second.held)
    True True
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCKING_AVAILABLE", "FileLock"]

#: Whether this platform has the locks (``flock``); without them every lock is granted at once.
LOCKING_AVAILABLE = fcntl is not None


class FileLock:
    """An advisory lock on ``path`` (created if missing), exclusive or shared.

    Locks conflict between open files, not only between processes: two ``FileLock`` objects on
    the same path in one process exclude each other like two processes would.

    Args:
        path: The lock file; its folder must exist.
        shared: A shared (reader) lock, compatible with other shared locks; otherwise exclusive.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "fold.lock"
        >>> with FileLock(path):
        ...     FileLock(path).acquire(blocking=False)
        False
    """

    def __init__(self, path: str | Path, *, shared: bool = False) -> None:
        self.path = Path(path)
        self.shared = shared
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, *, blocking: bool = True) -> bool:
        """Take the lock; without ``blocking``, return False at once when another holder has it.

        Raises:
            RuntimeError: The lock is already held by this object.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: lock already held by this object")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is None:
                break
            mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
            try:
                fcntl.flock(fd, mode if blocking else mode | fcntl.LOCK_NB)
                # A holder may have removed the file (release(remove=True)) while this one
                # waited on it: the lock then guards nothing, so start again on the new file.
                if _same_file(fd, self.path):
                    break
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        self._fd = fd
        return True

    def release(self, *, remove: bool = False) -> None:
        """Let the lock go (closing the file releases it); nothing happens when it is not held.

        Args:
            remove: Delete the lock file first (tidy-up by its last user; a process that was
                waiting on it notices and locks the path afresh).
        """
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)
