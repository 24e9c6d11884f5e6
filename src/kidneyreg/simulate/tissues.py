"""Tissue classes of the simulator's label maps and their CT and acoustic properties.

One label map drives both modalities: the CT renderer reads Hounsfield units per contrast phase,
the ultrasound renderer reads acoustic impedance (specular reflections at boundaries), attenuation,
and scatterer strength (echogenicity). Values are textbook figures (e.g. Duck, "Physical Properties
of Tissue"; typical contrast-enhanced CT attenuation by phase); the renderers add per-case random
variation on top, so nothing downstream should rely on the exact numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["PHASES", "TISSUES", "Tissue", "TissueProperties", "kidney_labels", "sinus_labels"]

PHASES = ("corticomedullary", "nephrographic", "plain")


class Tissue(IntEnum):
    """Label values of a simulator label map (uint8)."""

    AIR = 0  # outside the body
    FAT = 1  # subcutaneous, retroperitoneal and perirenal fat
    MUSCLE = 2  # abdominal wall, psoas, quadratus lumborum, paraspinal muscles, diaphragm
    BONE = 3  # vertebral bodies, posterior elements, ribs (cortex and marrow together)
    LIVER = 4
    SPLEEN = 5
    BOWEL = 6  # bowel wall and fluid/solid content
    GAS = 7  # bowel gas
    LUNG = 8  # lung bases / posterior costophrenic recesses
    CORTEX = 9  # renal cortex (including columns of Bertin)
    MEDULLA = 10  # medullary pyramids
    SINUS_FAT = 11  # renal sinus fat
    COLLECTING = 12  # pelvis and calyces, urine
    ARTERY = 13  # aorta and renal arteries
    VEIN = 14  # inferior vena cava and renal veins
    SOFT_TISSUE = 15  # other organs (pancreas, stomach wall, adrenals...) and unlabelled tissue
    FLUID = 16  # simple fluid outside the kidneys: gallbladder bile, bladder urine, spinal CSF


@dataclass(frozen=True)
class TissueProperties:
    """Physical properties of one tissue class.

    Attributes:
        hu: Mean CT attenuation in HU for each phase of :data:`PHASES`.
        hu_texture: Standard deviation (HU) of the tissue's own spatial texture (not scanner noise).
        impedance: Acoustic impedance in MRayl.
        attenuation: Ultrasound attenuation in dB / (cm MHz).
        echogenicity: Mean backscatter amplitude relative to liver (liver = 1.0; 0 = anechoic).
        shadows: True when the tissue blocks the beam (bone, gas, lung).
    """

    hu: dict[str, float]
    hu_texture: float
    impedance: float
    attenuation: float
    echogenicity: float
    shadows: bool = False


def _hu(cm: float, np_: float, plain: float) -> dict[str, float]:
    return {"corticomedullary": cm, "nephrographic": np_, "plain": plain}


TISSUES: dict[Tissue, TissueProperties] = {
    Tissue.AIR: TissueProperties(_hu(-1000, -1000, -1000), 5, 0.0004, 0.0, 0.0, True),
    Tissue.FAT: TissueProperties(_hu(-100, -100, -100), 12, 1.38, 0.6, 0.85),
    Tissue.MUSCLE: TissueProperties(_hu(55, 60, 45), 10, 1.70, 1.1, 0.55),
    Tissue.BONE: TissueProperties(_hu(500, 500, 500), 60, 7.80, 20.0, 1.5, True),
    Tissue.LIVER: TissueProperties(_hu(80, 105, 58), 8, 1.66, 0.5, 1.0),
    Tissue.SPLEEN: TissueProperties(_hu(120, 115, 48), 8, 1.66, 0.5, 1.05),
    Tissue.BOWEL: TissueProperties(_hu(40, 50, 30), 20, 1.60, 0.8, 0.8),
    Tissue.GAS: TissueProperties(_hu(-950, -950, -950), 30, 0.0004, 40.0, 1.8, True),
    Tissue.LUNG: TissueProperties(_hu(-850, -850, -850), 40, 0.26, 40.0, 1.6, True),
    Tissue.CORTEX: TissueProperties(_hu(190, 160, 35), 10, 1.65, 0.7, 0.8),
    Tissue.MEDULLA: TissueProperties(_hu(80, 165, 30), 10, 1.62, 0.7, 0.35),
    Tissue.SINUS_FAT: TissueProperties(_hu(-80, -80, -80), 25, 1.40, 0.6, 1.6),
    Tissue.COLLECTING: TissueProperties(_hu(10, 15, 8), 4, 1.52, 0.05, 0.0),
    Tissue.ARTERY: TissueProperties(_hu(260, 160, 42), 6, 1.66, 0.2, 0.02),
    Tissue.VEIN: TissueProperties(_hu(130, 150, 42), 6, 1.66, 0.2, 0.02),
    Tissue.SOFT_TISSUE: TissueProperties(_hu(60, 70, 40), 12, 1.63, 0.7, 0.75),
    Tissue.FLUID: TissueProperties(_hu(8, 10, 8), 4, 1.52, 0.05, 0.0),
}

#: Labels that together form "the kidney" of a kidney mask (KiTS convention: the whole organ).
KIDNEY_TISSUES = (Tissue.CORTEX, Tissue.MEDULLA, Tissue.SINUS_FAT, Tissue.COLLECTING)


def kidney_labels() -> tuple[int, ...]:
    """Label values that belong to the kidney mask."""
    return tuple(int(t) for t in KIDNEY_TISSUES)


def sinus_labels() -> tuple[int, ...]:
    """Label values of the renal sinus: sinus fat and the collecting system (inside the kidney
    mask; on U/S the central echo complex)."""
    return (int(Tissue.SINUS_FAT), int(Tissue.COLLECTING))
