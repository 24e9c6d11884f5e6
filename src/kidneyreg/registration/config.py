"""Configuration of the hierarchical rigid registration network and of its FIM loss.

One frozen dataclass holds every number of the network (widths, window size, parameter ranges,
ablation switches, the speed options) and of the loss (weights of Eq. 1 and 4), so that a
checkpoint can store it as a plain dictionary (:meth:`RegistrationConfig.to_dict`) and rebuild the
same model (:meth:`RegistrationConfig.from_dict`).

Defaults follow the paper (Chi et al. 2023, "Registration Network"): encoder 8, 16, 16 channels,
decoder 16, 16, 16, 16, 8, 8, four hierarchical levels with translation weights 2, 1, 0.5, 0.25,
window Nw = 5, lambda_1 = 0.01, lambda_2 = 0.001.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from kidneyreg.profiles import Profile, get_profile

__all__ = [
    "DEFAULT_MAX_ROTATION_DEG",
    "DEFAULT_MAX_TRANSLATION_MM",
    "STRUCTURES",
    "RegistrationConfig",
]

#: Structures a registration network can take feature maps of.
STRUCTURES: tuple[str, ...] = ("kidney", "sinus")

#: Largest rotation per Euler angle the network can output (degrees). The paper's group B has
#: rotation norms of 24.7 +- 2.3 deg (2 sigma: 29.3 deg) with random axes, so one angle alone can
#: reach ~29 deg; 40 deg keeps that at tanh = 0.73, where tanh still has half of its slope, and
#: leaves room for the ~3 deg of breathing rotation.
DEFAULT_MAX_ROTATION_DEG = 40.0
#: Largest translation per axis the network can output (mm). Group B translation norms are
#: 5.0 +- 1.2 mm (2 sigma: 7.4 mm); breathing moves the kidney 10-20 mm peak-to-peak along S-I,
#: so a window whose crop is not re-centred on it may start up to ~10 mm off. 25 mm keeps
#: 7.4 + 10 mm at tanh = 0.7.
DEFAULT_MAX_TRANSLATION_MM = 25.0

# Every spatial size must halve exactly three times (three stride-2 encoder convolutions), so that
# each decoder level upsamples by exactly 2 and the slab crops below line up voxel for voxel.
_DOWNSAMPLING = 8


@dataclass(frozen=True)
class RegistrationConfig:
    """Every setting of :class:`~kidneyreg.registration.network.RegistrationNet` and its loss.

    Attributes:
        volume_shape: Registration volume size in voxels, ITK order (nx R-L, ny A-P, nz S-I);
            each must be a multiple of 8.
        spacing: Isotropic voxel size in mm (internal mm = (index - n // 2) * spacing).
        window: Nw, the number of U/S frames per window (odd; the paper uses 5, Appendix G 1/3/5).
        use_images: Feed the images as well as the kidney feature maps (4 input channels instead
            of 2). The paper feeds the feature maps ("image representations").
        structures: The anatomical structures with a feature map, ``"kidney"`` first (the
            paper's kidney map); ``("kidney", "sinus")`` adds the renal sinus (sinus fat and
            collecting system: the central echo complex on U/S), which pins down the plane's
            out-of-plane tilt far better than the kidney outline
            (``benchmarks/tilt_observability.py``). Every map enters the network and the
            feature loss (mean Dice over the structures).
        encoder_channels: Widths of the stride-2 encoder convolutions (paper: 8, 16, 16).
        decoder_channels: Widths of the decoder convolutions (paper: 16, 16, 16, 16, 8, 8): one
            per upsampling level, then the extra full-resolution ones.
        use_decoder: False = the "without decoder layers" ablation: one head on the bottleneck.
        hierarchical: False = the "without hierarchical regression" ablation: only the
            finest level's head.
        translation_weights: Weight of each level's translation, coarsest first (paper:
            {8, 4, 2, 1} / 4). Rotations are averaged over levels.
        max_rotation_deg: Largest Euler angle of the final transform (per angle).
        max_translation_mm: Largest translation of the final transform (per axis). Each level's
            tanh output is scaled by ``max_translation_mm / sum(weights)``, so the weighted sum
            stays within the range; the coarsest level alone covers 2 / 3.75 of it.
        head_attention_maps: Number of learned spatial attention maps per regression head.
        head_hidden: Width of the hidden layer of each regression head.
        decoder_slab_half_width: The finest ``decoder_slab_levels`` decoder levels are computed
            only on the R-L slab ``|x index - nx // 2| <= h`` (full-resolution voxels; the
            matching coarse voxels at 1/2 resolution), where the U/S window and the loss are;
            coarser levels keep the whole volume. Default 2: the window's half width at Nw = 5
            and MIND's reach; at the ``cpu`` profile ~14x faster forward and ~7x faster
            forward + backward than the whole volume (``benchmarks/bench_registration.py``).
            None = the paper's decoder on the whole volume. Must be >= ``window // 2``.
        decoder_slab_levels: How many of the finest decoder levels use the slab (1 or 2).
        channels_last: Run the convolutions in channels-last memory layout (same results,
            1.5-2x faster on CPU with oneDNN).
        lambda_image: lambda_1 of Eq. (1), weight of the MIND image loss.
        lambda_motion: lambda_2 of Eq. (1), weight of the transformation loss.
        motion_identity_weight: Weight of ``||D - I|| / Nw`` in Eq. (4) (paper 0.01).
        motion_smoothness_weight: Weight of the second difference in Eq. (4) (paper 0.99).
        use_mind: False = the "without MIND loss" ablation (lambda_1 term dropped).
        mind_epsilon: Added to the MIND variance estimate V(x) so flat regions give finite values.
        dice_epsilon: Added to the Dice denominator so empty maps give a finite value.

    Example:
        >>> config = RegistrationConfig.from_profile("tiny", window=3)
        >>> config.volume_shape, config.window, config.input_channels
        ((32, 56, 72), 3, 2)
    """

    volume_shape: tuple[int, int, int]
    spacing: float
    window: int = 5
    use_images: bool = False
    structures: tuple[str, ...] = ("kidney",)
    encoder_channels: tuple[int, ...] = (8, 16, 16)
    decoder_channels: tuple[int, ...] = (16, 16, 16, 16, 8, 8)
    use_decoder: bool = True
    hierarchical: bool = True
    translation_weights: tuple[float, ...] = (2.0, 1.0, 0.5, 0.25)
    max_rotation_deg: float = DEFAULT_MAX_ROTATION_DEG
    max_translation_mm: float = DEFAULT_MAX_TRANSLATION_MM
    head_attention_maps: int = 4
    head_hidden: int = 64
    decoder_slab_half_width: int | None = 2
    decoder_slab_levels: int = 2
    channels_last: bool = True
    lambda_image: float = 0.01
    lambda_motion: float = 0.001
    motion_identity_weight: float = 0.01
    motion_smoothness_weight: float = 0.99
    use_mind: bool = True
    mind_epsilon: float = 1e-6
    dice_epsilon: float = 1e-6

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so that from_dict(to_dict()) round-trips and equality holds.
        object.__setattr__(self, "volume_shape", tuple(int(n) for n in self.volume_shape))
        object.__setattr__(self, "structures", tuple(str(n) for n in self.structures))
        for name in ("encoder_channels", "decoder_channels"):
            object.__setattr__(self, name, tuple(int(c) for c in getattr(self, name)))
        object.__setattr__(
            self, "translation_weights", tuple(float(w) for w in self.translation_weights)
        )
        self._validate()

    def _validate(self) -> None:
        if len(self.volume_shape) != 3 or any(n % _DOWNSAMPLING for n in self.volume_shape):
            raise ValueError(
                f"volume_shape must be 3 sizes that are multiples of {_DOWNSAMPLING}, "
                f"got {self.volume_shape}"
            )
        if (
            not self.structures
            or self.structures[0] != "kidney"
            or len(set(self.structures)) != len(self.structures)
            or not set(self.structures) <= set(STRUCTURES)
        ):
            raise ValueError(
                f"structures must start with 'kidney' and name each of {', '.join(STRUCTURES)} "
                f"at most once, got {self.structures}"
            )
        if not (math.isfinite(self.spacing) and self.spacing > 0):
            raise ValueError(f"spacing must be a positive number of mm, got {self.spacing}")
        if self.window < 1 or self.window % 2 == 0 or self.window > self.volume_shape[0]:
            raise ValueError(
                f"window must be odd, >= 1 and <= nx = {self.volume_shape[0]}, got {self.window}"
            )
        if len(self.encoder_channels) != 3:
            raise ValueError(
                f"encoder_channels needs 3 widths (three stride-2 levels), got "
                f"{self.encoder_channels}"
            )
        if len(self.decoder_channels) < 4:
            raise ValueError(
                "decoder_channels needs at least 4 widths (one per upsampling level), got "
                f"{self.decoder_channels}"
            )
        if any(c < 1 for c in self.encoder_channels + self.decoder_channels):
            raise ValueError("channel widths must be positive")
        if len(self.translation_weights) != 4 or any(w <= 0 for w in self.translation_weights):
            raise ValueError(
                f"translation_weights needs 4 positive weights (coarsest first), got "
                f"{self.translation_weights}"
            )
        if not (0 < self.max_rotation_deg <= 90):
            raise ValueError(f"max_rotation_deg must be in (0, 90], got {self.max_rotation_deg}")
        if not (self.max_translation_mm > 0 and math.isfinite(self.max_translation_mm)):
            raise ValueError(f"max_translation_mm must be > 0, got {self.max_translation_mm}")
        if self.head_attention_maps < 1 or self.head_hidden < 1:
            raise ValueError("head_attention_maps and head_hidden must be >= 1")
        if self.decoder_slab_half_width is not None:
            if self.decoder_slab_half_width < self.window // 2:
                raise ValueError(
                    f"decoder_slab_half_width ({self.decoder_slab_half_width}) must cover the "
                    f"window (>= {self.window // 2}); raise it or set None for the whole volume"
                )
            if self.decoder_slab_half_width > self.volume_shape[0] // 2:
                raise ValueError(
                    f"decoder_slab_half_width {self.decoder_slab_half_width} is wider than "
                    f"the volume (at most nx // 2 = {self.volume_shape[0] // 2})"
                )
        if self.decoder_slab_levels not in (1, 2):
            raise ValueError(f"decoder_slab_levels must be 1 or 2, got {self.decoder_slab_levels}")
        for name in ("lambda_image", "lambda_motion", "motion_identity_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.motion_smoothness_weight < 0:
            raise ValueError("motion_smoothness_weight must be >= 0")
        if self.mind_epsilon <= 0 or self.dice_epsilon <= 0:
            raise ValueError("mind_epsilon and dice_epsilon must be > 0")

    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_profile(cls, profile: str | Profile, **overrides: Any) -> RegistrationConfig:
        """The configuration for a resolution profile, with any field overridden.

        Args:
            profile: A profile name (``paper``, ``cpu``, ``tiny``) or a
                :class:`~kidneyreg.profiles.Profile`.
            **overrides: Fields to change, e.g. ``window=3`` or ``use_decoder=False``.

        Example:
            >>> RegistrationConfig.from_profile("cpu").spacing
            1.6
        """
        p = get_profile(profile)
        values: dict[str, Any] = {
            "volume_shape": p.volume_shape,
            "spacing": p.spacing,
            "window": p.window,
        }
        values.update(overrides)
        return cls(**values)

    def with_changes(self, **changes: Any) -> RegistrationConfig:
        """A copy with some fields changed (validated again).

        Example:
            >>> RegistrationConfig.from_profile("tiny").with_changes(hierarchical=False).levels
            1
        """
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary (tuples become lists) for checkpoints and JSON.

        Example:
            >>> RegistrationConfig.from_profile("tiny").to_dict()["volume_shape"]
            [32, 56, 72]
        """
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RegistrationConfig:
        """Rebuild a configuration from :meth:`to_dict` output.

        Raises:
            ValueError: On unknown keys or invalid values.

        Example:
            >>> c = RegistrationConfig.from_profile("tiny")
            >>> RegistrationConfig.from_dict(c.to_dict()) == c
            True
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown registration config keys: {', '.join(unknown)}")
        return cls(**values)

    # ------------------------------------------------------------------------------------------

    @property
    def input_channels(self) -> int:
        """Channels entering the network: fixed and moving feature maps (+ images)."""
        return 2 * len(self.input_names)

    @property
    def input_names(self) -> tuple[str, ...]:
        """What each network input channel of one side (fixed or moving) holds, in order."""
        return ("kidney", *(("image",) if self.use_images else ()), *self.structures[1:])

    @property
    def volume_channels(self) -> tuple[int, ...]:
        """Channel of a fixed/moving volume (kidney, image, extra structures) for each input."""
        extra = {name: 1 + i for i, name in enumerate(self.structures) if i > 0}
        index = {"kidney": 0, "image": 1} | extra
        return tuple(index[name] for name in self.input_names)

    @property
    def feature_volume_channels(self) -> tuple[int, ...]:
        """Channel of a fixed/moving volume holding each structure's map (kidney first)."""
        return (0, *range(2, 1 + len(self.structures)))

    @property
    def levels(self) -> int:
        """Number of regression heads whose outputs are combined (4, or 1 in the ablations)."""
        if not self.use_decoder or not self.hierarchical:
            return 1
        return 4

    @property
    def level_translation_weights(self) -> tuple[float, ...]:
        """Translation weight of each active head, coarsest first (``(1.0,)`` with one head)."""
        return self.translation_weights if self.levels == 4 else (1.0,)

    @property
    def max_rotation_rad(self) -> float:
        """:attr:`max_rotation_deg` in radians."""
        return math.radians(self.max_rotation_deg)

    @property
    def level_translation_scale_mm(self) -> float:
        """mm per unit of a head's tanh output: the final translation stays within range."""
        return self.max_translation_mm / sum(self.level_translation_weights)
