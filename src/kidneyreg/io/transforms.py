"""Transform files: ``transforms.json`` (DESIGN.md section 2), ITK ``.tfm`` and a parameter CSV.

Every matrix is a frame pose ``M`` (4x4, row-major, acting on column vectors): U/S image mm
``(u, v, 0, 1)`` -> CT world LPS mm, the "image to reference" convention of PLUS/SlicerIGT.

Writers go through :func:`kidneyreg.io.atomic.atomic_path`; readers validate and raise
:class:`~kidneyreg.errors.InputError` with a one-line message naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from kidneyreg.errors import InputError
from kidneyreg.io.atomic import atomic_path, atomic_write_text
from kidneyreg.io.image import short_error_reason

__all__ = [
    "CONVENTION",
    "PARAMETER_CSV_HEADER",
    "TransformSequence",
    "read_parameters_csv",
    "read_tfm",
    "read_transforms_json",
    "write_parameters_csv",
    "write_tfm",
    "write_transforms_json",
]

#: The value of the "convention" key of every transforms file.
CONVENTION = "us_image_mm_to_ct_world_lps"
#: Columns of the rigid-parameter CSV (angles in degrees, translations in mm).
PARAMETER_CSV_HEADER = ("frame", "rx_deg", "ry_deg", "rz_deg", "tx_mm", "ty_mm", "tz_mm")

_RIGID_ATOL = 1e-4  # orthonormality and determinant tolerance of a rotation block
_BOTTOM_ROW_ATOL = 1e-6
_RESERVED_FRAME_KEYS = ("index", "matrix")
_ITK_TRANSFORM_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".mat")  # SimpleITK picks by suffix
_RESERVED_TOP_KEYS = ("convention", "frames")
# ITK transform types that are affine maps; anything else (B-spline, displacement field) is not.
_LINEAR_ITK_TRANSFORMS = frozenset(
    {
        "AffineTransform",
        "ComposeScaleSkewVersor3DTransform",
        "Euler3DTransform",
        "MatrixOffsetTransformBase",
        "QuaternionRigidTransform",
        "ScaleSkewVersor3DTransform",
        "ScaleTransform",
        "ScaleVersor3DTransform",
        "Similarity3DTransform",
        "TranslationTransform",
        "VersorRigid3DTransform",
        "VersorTransform",
        "IdentityTransform",
    }
)


def _rigidity_problem(matrix: np.ndarray) -> str | None:
    """Why a 4x4 matrix is not a proper rigid transform, or None when it is one."""
    if matrix.shape != (4, 4):
        return f"is not 4x4 (shape {matrix.shape})"
    if not np.all(np.isfinite(matrix)):
        return "has non-finite values"
    if np.any(np.abs(matrix[3] - (0.0, 0.0, 0.0, 1.0)) > _BOTTOM_ROW_ATOL):
        return "bottom row is not [0, 0, 0, 1]"
    rotation = matrix[:3, :3]
    orthogonality = float(np.max(np.abs(rotation.T @ rotation - np.eye(3))))
    determinant = float(np.linalg.det(rotation))
    if orthogonality > _RIGID_ATOL or abs(determinant - 1.0) > _RIGID_ATOL:
        return (
            f"is not rigid (rotation block off orthonormal by {orthogonality:.2g}, "
            f"determinant {determinant:.6g})"
        )
    return None


@dataclass(eq=False)
class TransformSequence:
    """Per-frame poses read from a transforms file.

    Attributes:
        matrices: float64 ``(n, 4, 4)``; ``matrices[k]`` maps frame k's U/S image mm to CT world.
        indices: Frame indices, always ``0..n-1``.
        frame_extras: Per frame, the keys besides "index" and "matrix" (confidence, loss...).
        extras: Top-level keys besides "convention" and "frames".
        source: The file read, for error messages.

    Example:
        >>> seq = TransformSequence(np.eye(4)[None], [0], [{}], {})
        >>> seq.broadcast_to(3).matrices.shape
        (3, 4, 4)
    """

    matrices: np.ndarray
    indices: list[int]
    frame_extras: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        self.matrices = np.asarray(self.matrices, dtype=np.float64)
        if self.matrices.ndim != 3 or self.matrices.shape[1:] != (4, 4):
            raise ValueError(f"matrices must be (n, 4, 4), got {self.matrices.shape}")
        if not self.frame_extras:
            self.frame_extras = [{} for _ in range(len(self.matrices))]
        if len(self.indices) != len(self.matrices) or len(self.frame_extras) != len(self.matrices):
            raise ValueError("matrices, indices and frame_extras must have the same length")

    @property
    def n_frames(self) -> int:
        """Number of frames."""
        return int(self.matrices.shape[0])

    def __len__(self) -> int:
        return self.n_frames

    def broadcast_to(self, n_frames: int) -> TransformSequence:
        """Return a sequence of ``n_frames`` poses: itself, or its single pose repeated.

        This is the ``--init`` rule of DESIGN.md: one frame for all frames, or one per frame.

        Args:
            n_frames: Number of frames of the U/S sequence.

        Raises:
            InputError: The file has neither 1 nor ``n_frames`` frames.

        Example:
            >>> one = TransformSequence(np.eye(4)[None], [0], [{}], {})
            >>> one.broadcast_to(5).indices
            [0, 1, 2, 3, 4]
        """
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames}")
        if self.n_frames == n_frames:
            return self
        if self.n_frames != 1:
            raise InputError(
                self.source,
                f"has {self.n_frames} frames; expected 1 (one pose for all) or {n_frames}",
            )
        return TransformSequence(
            np.repeat(self.matrices, n_frames, axis=0),
            list(range(n_frames)),
            [dict(self.frame_extras[0]) for _ in range(n_frames)],
            dict(self.extras),
            self.source,
        )


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON types from numpy scalars/arrays; non-finite floats become null."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None  # JSON has no NaN / Infinity
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"{where}: JSON object keys must be strings")
        return {key: _jsonable(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, where) for item in value]
    raise TypeError(f"{where}: {type(value).__name__} cannot be written to JSON")


def write_transforms_json(
    path: str | Path,
    matrices: Sequence[np.ndarray] | np.ndarray,
    *,
    frame_extras: Sequence[Mapping[str, Any]] | None = None,
    extras: Mapping[str, Any] | None = None,
) -> Path:
    """Write per-frame poses in the DESIGN.md transforms schema, atomically.

    The file holds ``{"convention": "us_image_mm_to_ct_world_lps", <extras>..., "frames":
    [{"index": k, "matrix": [[4 floats] x 4], <frame extras>...}, ...]}``, one frame per line.
    Floats are written with ``repr`` precision, so reading gives back the very same float64.
    NaN or infinite extra values are written as ``null`` (JSON has neither).

    Args:
        path: Destination (``transforms.json``, ``ground_truth.json``...).
        matrices: ``(n, 4, 4)`` or a single ``(4, 4)`` rigid matrices.
        frame_extras: Optional per-frame dictionaries of extra keys (n of them).
        extras: Optional top-level extra keys (timing, cycle boundaries...).

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: Wrong shapes, a matrix that is not rigid, or reserved extra keys.
        TypeError: An extra value that is not JSON-serialisable.

    Example:
        >>> write_transforms_json("out/transforms.json", [np.eye(4)] * 3)  # doctest: +SKIP
        PosixPath('out/transforms.json')
    """
    stack = np.asarray(matrices, dtype=np.float64)
    if stack.ndim == 2:
        stack = stack[np.newaxis]
    if stack.ndim != 3 or stack.shape[1:] != (4, 4) or len(stack) == 0:
        raise ValueError(f"matrices must be (n, 4, 4) with n >= 1, got {stack.shape}")
    for k, matrix in enumerate(stack):
        problem = _rigidity_problem(matrix)
        if problem is not None:
            raise ValueError(f"frame {k} matrix {problem}")
    per_frame = [dict(e) for e in frame_extras] if frame_extras is not None else None
    if per_frame is not None and len(per_frame) != len(stack):
        raise ValueError(f"{len(per_frame)} frame_extras for {len(stack)} matrices")
    top = dict(extras or {})
    if any(key in top for key in _RESERVED_TOP_KEYS):
        raise ValueError(f"extras may not use the keys {_RESERVED_TOP_KEYS}")

    lines = ["{", f'  "convention": {json.dumps(CONVENTION)},']
    for key, value in top.items():
        if not isinstance(key, str):
            raise TypeError("extras keys must be strings")
        lines.append(f"  {json.dumps(key)}: {json.dumps(_jsonable(value, key))},")
    frames = []
    for k, matrix in enumerate(stack):
        entry: dict[str, Any] = {"index": k, "matrix": matrix.tolist()}
        if per_frame is not None:
            if any(key in per_frame[k] for key in _RESERVED_FRAME_KEYS):
                raise ValueError(f"frame_extras may not use the keys {_RESERVED_FRAME_KEYS}")
            entry.update(_jsonable(per_frame[k], f"frame {k}"))
        frames.append("    " + json.dumps(entry, allow_nan=False))
    lines.append('  "frames": [')
    lines.append(",\n".join(frames))
    lines.append("  ]")
    lines.append("}")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_transforms_json(
    path: str | Path, *, expected_frames: int | None = None
) -> TransformSequence:
    """Read and validate a transforms file of the DESIGN.md schema.

    Args:
        path: ``transforms.json``, ``ground_truth.json`` or an ``--init`` file.
        expected_frames: When given, the file must hold exactly this many frames (use
            :meth:`TransformSequence.broadcast_to` instead to also accept one pose for all).

    Returns:
        The validated poses and the extra keys.

    Raises:
        InputError: Missing file, invalid JSON, wrong or missing convention, no frames, frame
            indices not ``0..n-1`` in order, a matrix that is not 4x4, has non-finite values,
            a bottom row other than ``[0, 0, 0, 1]`` or a rotation that is not proper
            orthonormal (tolerance 1e-4), or a frame count other than ``expected_frames``.

    Example:
        >>> poses = read_transforms_json("transforms.json", expected_frames=40)  # doctest: +SKIP
        >>> poses.matrices.shape  # doctest: +SKIP
        (40, 4, 4)
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "transforms file does not exist")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(
            path, f"is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot be read ({short_error_reason(error)})") from None
    if not isinstance(document, dict):
        raise InputError(path, "is not a JSON object with 'convention' and 'frames'")
    convention = document.get("convention")
    if convention != CONVENTION:
        found = "missing" if convention is None else json.dumps(convention)
        raise InputError(path, f"convention is {found}, expected {json.dumps(CONVENTION)}")
    frames = document.get("frames")
    if not isinstance(frames, list) or not frames:
        raise InputError(path, "has no 'frames' list (or it is empty)")
    indices: list[int] = []
    matrices = np.empty((len(frames), 4, 4))
    frame_extras: list[dict[str, Any]] = []
    for position, frame in enumerate(frames):
        if not isinstance(frame, dict) or "matrix" not in frame or "index" not in frame:
            raise InputError(path, f"frame entry {position} lacks 'index' or 'matrix'")
        index = frame["index"]
        if not isinstance(index, int) or isinstance(index, bool) or index != position:
            raise InputError(
                path,
                f"frame indices must be 0..{len(frames) - 1} in order; entry {position} "
                f"has index {json.dumps(index)}",
            )
        try:
            matrix = np.asarray(frame["matrix"], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(path, f"frame {index} matrix is not a 4x4 array of numbers") from None
        problem = _rigidity_problem(matrix)
        if problem is not None:
            raise InputError(path, f"frame {index} matrix {problem}")
        indices.append(index)
        matrices[position] = matrix
        frame_extras.append({k: v for k, v in frame.items() if k not in _RESERVED_FRAME_KEYS})
    if expected_frames is not None and len(frames) != expected_frames:
        raise InputError(path, f"has {len(frames)} frames, the U/S sequence has {expected_frames}")
    extras = {k: v for k, v in document.items() if k not in _RESERVED_TOP_KEYS}
    return TransformSequence(matrices, indices, frame_extras, extras, str(path))


def _checked_affine(matrix: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    array = np.asarray(matrix, dtype=np.float64)
    if array.shape != (4, 4) or not np.all(np.isfinite(array)):
        raise ValueError(f"need a finite 4x4 matrix, got shape {array.shape}")
    if np.any(np.abs(array[3] - (0.0, 0.0, 0.0, 1.0)) > _BOTTOM_ROW_ATOL):
        raise ValueError("the 4x4 matrix's bottom row must be [0, 0, 0, 1]")
    return array


def write_tfm(path: str | Path, matrix: np.ndarray | Sequence[Sequence[float]]) -> Path:
    """Write one pose ``M`` as an ITK transform file (``AffineTransform_double_3_3``), atomically.

    The file holds ``M`` itself, as an ``AffineTransform`` with matrix = ``M[:3, :3]``,
    translation = ``M[:3, 3]`` and centre 0. An affine type is used rather than
    ``Euler3DTransform`` because it stores the 12 numbers exactly (Euler angles would be a lossy
    re-parametrisation) and it is what 3D Slicer writes for linear transforms itself.

    In ITK's resampling convention the transform maps points of the output (U/S frame) grid to the
    input (CT) image, so ``sitk.Resample(ct, frame_reference, sitk.ReadTransform(path))``
    reslices the CT on the U/S frame, where ``frame_reference`` is the frame as a 3D image of
    one slice with spacing ``(sx, sy, 1)``, origin 0 and identity direction.

    In 3D Slicer (Data > Add Data, or drag the file in) the file loads as a linear transform.
    Slicer treats ITK files as resampling transforms ("from parent"): applying the loaded
    transform to the CT brings the CT into U/S image space (aligned with a U/S frame loaded at
    origin 0, identity direction); invert it (Transforms module, "Invert") and apply it to the
    U/S frame to place the frame in the CT instead.

    Args:
        path: Destination ending in ``.tfm`` (or ``.txt``, ``.h5``, ``.mat``); the temporary
            file keeps the suffix so that SimpleITK writes the same format.
        matrix: The 4x4 pose (U/S image mm -> CT world LPS mm).

    Returns:
        ``path`` as a Path.

    Example:
        >>> write_tfm("out/frame_0000.tfm", np.eye(4))  # doctest: +SKIP
        PosixPath('out/frame_0000.tfm')
    """
    if Path(path).suffix.lower() not in _ITK_TRANSFORM_SUFFIXES:
        raise ValueError(f"{path}: an ITK transform file needs one of {_ITK_TRANSFORM_SUFFIXES}")
    array = _checked_affine(matrix)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(array[:3, :3].ravel().tolist())
    transform.SetTranslation(array[:3, 3].tolist())
    transform.SetCenter((0.0, 0.0, 0.0))
    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return Path(path)


def _transform_names(transform: sitk.Transform) -> list[str]:
    """Class names of a transform and, for a composite, of all its parts."""
    name = transform.GetName()
    if name != "CompositeTransform":
        return [name]
    composite = sitk.CompositeTransform(transform)
    names: list[str] = []
    for k in range(composite.GetNumberOfTransforms()):
        names.extend(_transform_names(composite.GetNthTransform(k)))
    return names


def read_tfm(path: str | Path) -> np.ndarray:
    """Read an ITK transform file as the 4x4 matrix of the point mapping it performs.

    Any 3D affine-family transform (affine, Euler, versor, similarity, translation...) or a
    composite of them is accepted. The matrix is measured from the transform itself
    (``T(0)`` and ``T(e_i) - T(0)``), so centre, offset and composition order are exactly ITK's.

    Args:
        path: A ``.tfm`` / ``.txt`` / ``.h5`` / ``.mat`` transform file.

    Returns:
        float64 ``(4, 4)`` with ``M @ [x, y, z, 1] = T(x, y, z)``.

    Raises:
        InputError: Missing or unreadable file, a 2D transform, or a non-affine transform.

    Example:
        >>> read_tfm("out/frame_0000.tfm")  # doctest: +SKIP
        array([[1., 0., 0., 0.], ...
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "transform file does not exist")
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as error:
        raise InputError(
            path, f"cannot be read as an ITK transform ({short_error_reason(error)})"
        ) from None
    if transform.GetDimension() != 3:
        raise InputError(path, f"holds a {transform.GetDimension()}D transform; 3D is needed")
    non_linear = [n for n in _transform_names(transform) if n not in _LINEAR_ITK_TRANSFORMS]
    if non_linear:
        raise InputError(path, f"holds a {non_linear[0]}, not an affine transform")
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    matrix = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        matrix[:3, axis] = np.array(transform.TransformPoint(unit)) - origin
    matrix[:3, 3] = origin
    return matrix


def write_parameters_csv(
    path: str | Path,
    params: np.ndarray,
    indices: Sequence[int] | np.ndarray | None = None,
) -> Path:
    """Write rigid parameters per frame as CSV (angles shown in degrees), atomically.

    Columns: ``frame,rx_deg,ry_deg,rz_deg,tx_mm,ty_mm,tz_mm``. The parameters follow
    docs/architecture.md (Euler angles of ``R = Rz @ Ry @ Rx``, then translations); values are
    written with ``repr`` precision.

    Args:
        path: Destination CSV.
        params: ``(n, 6)`` array ``(rx, ry, rz)`` in radians then ``(tx, ty, tz)`` in mm.
        indices: Frame numbers for the first column; ``0..n-1`` when None.

    Returns:
        ``path`` as a Path.

    Example:
        >>> write_parameters_csv("out/parameters.csv", np.zeros((3, 6)))  # doctest: +SKIP
        PosixPath('out/parameters.csv')
    """
    values = np.asarray(params, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != 6:
        raise ValueError(f"params must be (n, 6), got {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("params contain NaN or infinite values")
    frame_numbers = list(range(len(values))) if indices is None else [int(i) for i in indices]
    if len(frame_numbers) != len(values):
        raise ValueError(f"{len(frame_numbers)} indices for {len(values)} parameter rows")
    shown = values.copy()
    shown[:, :3] = np.degrees(values[:, :3])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PARAMETER_CSV_HEADER)
    for frame, row in zip(frame_numbers, shown, strict=True):
        writer.writerow([frame, *(repr(float(v)) for v in row)])
    return atomic_write_text(path, buffer.getvalue())


def read_parameters_csv(path: str | Path) -> np.ndarray:
    """Read a CSV written by :func:`write_parameters_csv` back to radians and mm.

    Args:
        path: The CSV file.

    Returns:
        float64 ``(n, 6)``: ``(rx, ry, rz)`` in radians, ``(tx, ty, tz)`` in mm, in file order.

    Raises:
        InputError: Missing file, wrong header, a row without 7 fields, a value that is not a
            finite number, or no rows.

    Example:
        >>> read_parameters_csv("out/parameters.csv").shape  # doctest: +SKIP
        (3, 6)
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "parameter CSV does not exist")
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(path, f"cannot be read ({short_error_reason(error)})") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows or tuple(cell.strip() for cell in rows[0]) != PARAMETER_CSV_HEADER:
        raise InputError(path, f"header must be {','.join(PARAMETER_CSV_HEADER)}")
    if len(rows) == 1:
        raise InputError(path, "has no parameter rows")
    values = np.empty((len(rows) - 1, 6))
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(PARAMETER_CSV_HEADER):
            raise InputError(path, f"line {line} has {len(row)} fields, expected 7")
        try:
            int(row[0])
            numbers = [float(cell) for cell in row[1:]]
        except ValueError:
            raise InputError(path, f"line {line} holds a value that is not a number") from None
        if not all(math.isfinite(v) for v in numbers):
            raise InputError(path, f"line {line} holds NaN or infinite values")
        values[line - 2] = numbers
    values[:, :3] = np.radians(values[:, :3])
    return values
