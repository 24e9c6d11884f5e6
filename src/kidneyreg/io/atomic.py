"""Atomic file writing: write a temporary sibling, then rename it over the target.

A crash or an exception while writing never leaves a half-written file and never destroys the
previous version of the target: the rename is the only step that touches the final path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "current_umask",
    "replace_folder",
]

# Multi-part suffixes that writers (SimpleITK, imageio) recognise by name.
_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz", ".seg.nrrd")


def current_umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for compound in _COMPOUND_SUFFIXES:
        if name.endswith(compound):
            return path.name[-len(compound) :]
    return path.suffix


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary file keeps the target's suffix (``.nii.gz``, ``.tfm``, ``.png`` ...) so that
    writers choosing a format by extension behave as for the final name. The parent folder is
    created when missing. On any exception the temporary file is removed and ``path`` is left as
    it was.

    Args:
        path: Final destination.

    Yields:
        The temporary path to write to.

    Example:
        >>> import SimpleITK as sitk
        >>> with atomic_path("out/ct.nii.gz") as tmp:  # doctest: +SKIP
        ...     sitk.WriteImage(image, str(tmp))
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.name}.", suffix=f".tmp{_suffix(final)}", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise OSError(f"{final}: writer produced no data")
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def replace_folder(source: str | Path, destination: str | Path) -> None:
    """Put the finished folder ``source`` in the place of ``destination`` by renames.

    An existing ``destination`` is first moved aside (into a temporary sibling folder), then
    ``source`` is renamed onto it, then the old one is deleted: the destination path never holds
    a half-written folder, and a failure before the second rename leaves the old one in the
    temporary folder rather than destroying it. Both folders must be on the same file system.

    Example:
        >>> replace_folder("out.staging", "out")  # doctest: +SKIP
    """
    source, destination = Path(source), Path(destination)
    if not destination.exists():
        os.replace(source, destination)
        return
    aside = Path(
        tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=destination.parent)
    )
    try:
        os.replace(destination, aside / destination.name)
        os.replace(source, destination)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
