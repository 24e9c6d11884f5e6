"""Model checkpoints: atomic saving and safe loading, shared by every network of the package.

A checkpoint file is a ``torch.save`` archive of one dictionary::

    {"format": "kidneyreg-checkpoint", "version": 1, "kind": "<what it holds>", "payload": {...}}

``kind`` names what the payload is (``"feature-net"``, ``"registration-net"``...), so a file of one
network is never loaded as another. Loading uses ``torch.load(..., weights_only=True)`` only: the
file is never unpickled as arbitrary code, which is why payloads are restricted to tensors,
dictionaries, lists, tuples, strings, numbers, booleans and None (configurations are stored as
plain dictionaries, never as objects).

Every problem with a file (missing, truncated, not a PyTorch archive, a foreign or newer
checkpoint) raises :class:`~kidneyreg.errors.InputError` with one line naming the file.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kidneyreg.errors import InputError
from kidneyreg.io.atomic import atomic_path

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load_checkpoint", "save_checkpoint"]

#: Marker stored in every checkpoint written by this package.
CHECKPOINT_FORMAT = "kidneyreg-checkpoint"
#: Version of the wrapper layout; a newer file is refused with a clear message.
CHECKPOINT_VERSION = 1

_SCALARS = (str, int, float, bool, type(None))


def _check_payload(value: Any, where: str) -> None:
    """Raise TypeError when ``value`` holds anything ``weights_only`` loading would refuse."""
    if isinstance(value, (torch.Tensor, *_SCALARS)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"checkpoint key {where}[{key!r}] must be a str or an int")
            _check_payload(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_payload(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"checkpoint value {where} has type {type(value).__name__}; only tensors, dicts, lists, "
        "tuples, str, int, float, bool and None can be loaded safely"
    )


def save_checkpoint(path: str | Path, payload: Mapping[str, Any], *, kind: str) -> Path:
    """Write ``payload`` as a ``kind`` checkpoint, atomically (temporary sibling, then rename).

    Args:
        path: Destination file (``.pt`` by convention); its folder is created when missing.
        payload: Tensors, (nested) dicts, lists, tuples, str, int, float, bool and None only.
        kind: What the payload is, checked again by :func:`load_checkpoint`.

    Returns:
        ``path`` as a Path.

    Raises:
        TypeError: If the payload holds a value that safe loading would refuse.
        ValueError: If ``kind`` is empty.

    Example:
        >>> payload = {"model": net.state_dict()}  # doctest: +SKIP
        >>> save_checkpoint("model.pt", payload, kind="feature-net")  # doctest: +SKIP
        PosixPath('model.pt')
    """
    if not kind:
        raise ValueError("checkpoint kind must be a non-empty string")
    if not isinstance(payload, Mapping):
        raise TypeError(f"checkpoint payload must be a mapping, got {type(payload).__name__}")
    _check_payload(payload, "payload")
    wrapper = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": kind,
        "payload": dict(payload),
    }
    with atomic_path(path) as tmp:
        torch.save(wrapper, tmp)
    return Path(path)


def load_checkpoint(
    path: str | Path, *, kind: str, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load the payload of a ``kind`` checkpoint written by :func:`save_checkpoint`.

    Only ``torch.load(..., weights_only=True)`` is used: a file holding code or arbitrary objects
    is refused, never executed.

    Args:
        path: The checkpoint file.
        kind: The kind expected (e.g. ``"feature-net"``).
        map_location: Where tensors are loaded (``"cpu"`` by default).

    Returns:
        The payload dictionary.

    Raises:
        InputError: Missing file, a folder, a truncated or non-PyTorch file, a file holding
            objects that safe loading refuses, a foreign checkpoint, another kind, a newer
            format version.

    Example:
        >>> payload = load_checkpoint("model.pt", kind="feature-net")  # doctest: +SKIP
        >>> sorted(payload)  # doctest: +SKIP
        ['config', 'model']
    """
    file = Path(path)
    if not file.exists():
        raise InputError(file, "checkpoint file does not exist")
    if file.is_dir():
        raise InputError(file, "is a folder, not a checkpoint file")
    try:
        # torch warns about pickle protocols of foreign files; the error below says it better.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(
            file, "safe (weights_only) loading refuses its contents: not a kidneyreg checkpoint"
        ) from None
    except Exception:  # garbage bytes make the unpickler fail in many different ways
        raise InputError(
            file, "cannot be read as a checkpoint (truncated, corrupt or not a PyTorch file)"
        ) from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise InputError(file, "is not a kidneyreg checkpoint (foreign PyTorch file)")
    version = data.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION or version < 1:
        raise InputError(
            file,
            f"checkpoint format version {version!r} is not supported (this kidneyreg reads "
            f"versions up to {CHECKPOINT_VERSION})",
        )
    found = data.get("kind")
    if found != kind:
        raise InputError(file, f"is a {found!r} checkpoint, expected a {kind!r} checkpoint")
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise InputError(file, "checkpoint has no payload dictionary")
    return payload
