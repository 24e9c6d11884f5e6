"""Per-profile configuration of the feature networks (ULBNet for CT and for U/S windows).

The paper trains the CT net on 160 x 160 x 80 patches (R-L x A-P x S-I, 0.8 mm) and the U/S net on
256 x 192 x Nw windows (lateral columns x depth rows x frames, 0.8 mm, Nw = 5). A profile keeps
the same physical field of view at its own spacing, rounded to a multiple of 16 voxels along every
downsampled axis (a 5-level U-Net halves it four times): ``cpu`` (1.6 mm) gives 80 x 80 x 48 CT
patches and 128 x 96 x 5 U/S windows, ``tiny`` (3.2 mm, for tests) 48 x 48 x 16 and 64 x 48 x 5.

Sizes are stored in torch order: ``patch_size = (D, H, W)``, i.e. (S-I, A-P, R-L) for CT and
``(Nw, rows, cols)`` for U/S (``docs/architecture.md``). Widths are the paper's 16, 32, 64, 128,
256 times a width multiplier (1 for ``paper``, 1/2 for ``cpu``: ~4x fewer operations and
parameters, a bundled model of a few MB; 1/4 for ``tiny``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kidneyreg.profiles import get_profile

__all__ = [
    "BASE_WIDTHS",
    "FEATURE_STRUCTURES",
    "MODALITIES",
    "PAPER_CT_PATCH",
    "PAPER_SPACING",
    "PAPER_US_FRAME",
    "WIDTH_MULTIPLIERS",
    "FeatureNetConfig",
    "feature_config",
]

MODALITIES = ("ct", "us")
#: What a feature network segments: the kidney (the paper's feature maps) or its renal sinus
#: (sinus fat and collecting system, for the plane search; simulated training data only).
FEATURE_STRUCTURES = ("kidney", "sinus")
#: Encoder widths of the paper's ULBNet (decoder: the same in reverse).
BASE_WIDTHS = (16, 32, 64, 128, 256)
#: The paper's voxel size (mm) for both networks.
PAPER_SPACING = 0.8
#: The paper's CT patch in torch order (S-I, A-P, R-L) = "160 x 160 x 80" (x, y, z).
PAPER_CT_PATCH = (80, 160, 160)
#: The paper's U/S frame crop (rows along depth, columns along lateral) = "256 x 192" (x, y).
PAPER_US_FRAME = (192, 256)
#: Width multiplier per profile.
WIDTH_MULTIPLIERS = {"paper": 1.0, "cpu": 0.5, "tiny": 0.25}
# Every downsampled axis must be divisible by 2**4 (four stride-2 steps of a 5-level U-Net).
_DIVISOR = 16


def _scaled(n_paper: int, spacing: float) -> int:
    """The paper's size ``n_paper`` (at 0.8 mm) at ``spacing``, to the nearest multiple of 16."""
    exact = n_paper * PAPER_SPACING / spacing / _DIVISOR
    # Round half up so that the field of view is never more than half a block smaller.
    return max(_DIVISOR, int(exact + 0.5) * _DIVISOR)


def _int_tuple(values: Any, length: int, name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of {length} ints, got {values!r}") from None
    if len(out) != length or any(v < 1 for v in out):
        raise ValueError(f"{name} must be {length} positive ints, got {values!r}")
    return out


@dataclass(frozen=True)
class FeatureNetConfig:
    """Everything needed to rebuild a feature network and to feed it.

    Attributes:
        modality: ``"ct"`` or ``"us"``.
        profile: Name of the resolution profile it was made for.
        spacing: Voxel (CT) or pixel (U/S) size in mm of the network's input grid.
        patch_size: Training patch / inference window, torch order ``(D, H, W)``; for U/S
            ``(Nw, rows, cols)``.
        width_multiplier: Factor on :data:`BASE_WIDTHS`.
        num_res_units: Convolutions per residual block (MONAI ``ResidualUnit`` subunits).
        dropout: Dropout rate in every residual block (paper: 0.2).
        lbc_anchor_factor: Anchor filters per skip-connection channel.
        lbc_sparsity: Fraction of nonzero anchor weights.
        lbc_kernel: Anchor kernel size ``(D, H, W)``.
        lbc_activation: ``"sigmoid"`` or ``"relu"``.
        seed: Seed of the LBC anchors (part of the model: a checkpoint restores the anchors, and
            the same seed rebuilds them).
        structure: What the network segments, one of :data:`FEATURE_STRUCTURES`.

    Example:
        >>> cfg = feature_config("us", "cpu")
        >>> cfg.patch_size, cfg.window, cfg.strides[0]
        ((5, 96, 128), 5, (1, 2, 2))
    """

    modality: str
    profile: str
    spacing: float
    patch_size: tuple[int, int, int]
    width_multiplier: float = 1.0
    num_res_units: int = 2
    dropout: float = 0.2
    lbc_anchor_factor: float = 1.0
    lbc_sparsity: float = 0.5
    lbc_kernel: tuple[int, int, int] = (3, 3, 3)
    lbc_activation: str = "sigmoid"
    seed: int = 0
    base_widths: tuple[int, ...] = field(default=BASE_WIDTHS)
    structure: str = "kidney"

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.structure not in FEATURE_STRUCTURES:
            raise ValueError(
                f"structure must be one of {FEATURE_STRUCTURES}, got {self.structure!r}"
            )
        if not self.spacing > 0:
            raise ValueError(f"spacing must be > 0, got {self.spacing}")
        patch = _int_tuple(self.patch_size, 3, "patch_size")
        object.__setattr__(self, "patch_size", patch)
        object.__setattr__(self, "lbc_kernel", _int_tuple(self.lbc_kernel, 3, "lbc_kernel"))
        object.__setattr__(self, "base_widths", tuple(int(w) for w in self.base_widths))
        if len(self.base_widths) < 2:
            raise ValueError("base_widths needs at least two levels")
        factor = self.size_multiple
        downsampled = patch if self.modality == "ct" else patch[1:]
        if any(n % factor for n in downsampled):
            raise ValueError(
                f"patch_size {patch} must be divisible by {factor} along every downsampled axis"
            )
        if not self.width_multiplier > 0:
            raise ValueError(f"width_multiplier must be > 0, got {self.width_multiplier}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def size_multiple(self) -> int:
        """Total downsampling: every downsampled axis of an input must be a multiple of it."""
        return int(2 ** (len(self.base_widths) - 1))

    @property
    def widths(self) -> tuple[int, ...]:
        """Encoder widths after the multiplier (at least 2 channels each)."""
        return tuple(max(2, round(w * self.width_multiplier)) for w in self.base_widths)

    @property
    def strides(self) -> tuple[tuple[int, int, int], ...]:
        """Stride of each downsampling: 2 everywhere for CT, (1, 2, 2) for U/S (time kept)."""
        step = (2, 2, 2) if self.modality == "ct" else (1, 2, 2)
        return (step,) * (len(self.base_widths) - 1)

    @property
    def window(self) -> int:
        """Frames per U/S window (Nw); 1 for CT."""
        return self.patch_size[0] if self.modality == "us" else 1

    def with_window(self, window: int) -> FeatureNetConfig:
        """This U/S configuration with ``window`` frames (Appendix E's window-size study)."""
        if self.modality != "us":
            raise ValueError("only a U/S configuration has a window size")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        return dataclasses.replace(self, patch_size=(int(window), *self.patch_size[1:]))

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary (str, numbers, lists) for checkpoints and JSON."""
        out = dataclasses.asdict(self)
        for key in ("patch_size", "lbc_kernel", "base_widths"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused.

        Raises:
            ValueError: Unknown or missing keys, invalid values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown feature-net config keys: {sorted(unknown)}")
        values = dict(data)
        for key in ("patch_size", "lbc_kernel", "base_widths"):
            if key in values:
                values[key] = tuple(values[key])
        try:
            return cls(**values)
        except TypeError as error:
            raise ValueError(f"incomplete feature-net config: {error}") from None


def feature_config(
    modality: str,
    profile: str = "cpu",
    *,
    window: int | None = None,
    seed: int = 0,
    structure: str = "kidney",
) -> FeatureNetConfig:
    """The feature-net configuration of ``modality`` at ``profile``.

    Args:
        modality: ``"ct"`` or ``"us"``.
        profile: ``"paper"``, ``"cpu"`` or ``"tiny"`` (or a :class:`~kidneyreg.profiles.Profile`).
        window: U/S frames per window (default: the profile's, 5).
        seed: Seed of the LBC anchors.
        structure: What the network segments (:data:`FEATURE_STRUCTURES`).

    Returns:
        The configuration.

    Raises:
        ValueError: Unknown modality or profile.

    Example:
        >>> feature_config("ct", "paper").patch_size
        (80, 160, 160)
        >>> feature_config("ct", "cpu").patch_size, feature_config("ct", "cpu").widths
        ((48, 80, 80), (8, 16, 32, 64, 128))
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    prof = get_profile(profile)
    spacing = float(prof.spacing)
    multiplier = WIDTH_MULTIPLIERS.get(prof.name, 1.0)
    if modality == "ct":
        patch = tuple(_scaled(n, spacing) for n in PAPER_CT_PATCH)
    else:
        nw = prof.window if window is None else int(window)
        if nw < 1:
            raise ValueError(f"window must be >= 1, got {nw}")
        patch = (nw, *(_scaled(n, spacing) for n in PAPER_US_FRAME))
    return FeatureNetConfig(
        modality=modality,
        profile=prof.name,
        spacing=spacing,
        patch_size=patch,  # type: ignore[arg-type]
        width_multiplier=multiplier,
        seed=seed,
        structure=structure,
    )
