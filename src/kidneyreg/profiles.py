"""Resolution profiles: one pipeline, different numbers.

The paper works at 0.8 mm on 128 x 224 x 288 volumes (R-L x A-P x S-I). The ``cpu`` profile keeps
the same field of view at 1.6 mm so that adaptation and the demo run in minutes on two cores
(see ``../shared/MEASUREMENTS.md``: a train step at 64 x 112 x 144 costs ~2 s, at 128 x 224 x 288
~26 s); ``tiny`` halves it again for tests. Every size is in voxels of the profile's spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROFILES", "Profile", "get_profile"]


@dataclass(frozen=True)
class Profile:
    """Sizes and spacings of one resolution profile.

    Attributes:
        name: Profile name (``paper``, ``cpu`` or ``tiny``).
        spacing: Isotropic CT voxel size and U/S pixel size in mm.
        volume_shape: Registration volume size in voxels, ITK order (R-L, A-P, S-I).
        us_shape: Cropped U/S frame size in pixels as (rows along depth, columns along lateral);
            rows map onto A-P and columns onto S-I of the registration volume.
        window: Number of consecutive U/S frames per window (Nw); the middle one is the target.
    """

    name: str
    spacing: float
    volume_shape: tuple[int, int, int]
    us_shape: tuple[int, int]
    window: int = 5

    @property
    def field_of_view_mm(self) -> tuple[float, float, float]:
        """Physical extent of the registration volume in mm (R-L, A-P, S-I)."""
        return tuple(float(n * self.spacing) for n in self.volume_shape)  # type: ignore[return-value]


PROFILES: dict[str, Profile] = {
    "paper": Profile("paper", 0.8, (128, 224, 288), (224, 288)),
    "cpu": Profile("cpu", 1.6, (64, 112, 144), (112, 144)),
    "tiny": Profile("tiny", 3.2, (32, 56, 72), (56, 72)),
}


def get_profile(name: str | Profile) -> Profile:
    """Return the profile called ``name`` (a :class:`Profile` passes through).

    Raises:
        ValueError: If no profile has that name.

    Example:
        >>> get_profile("cpu").volume_shape
        (64, 112, 144)
    """
    if isinstance(name, Profile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None
