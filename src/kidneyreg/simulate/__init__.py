"""Synthetic patients with exact ground truth: anatomy, breathing, CT-to-U/S rendering.

Modules: :mod:`~kidneyreg.simulate.tissues` (label table), :mod:`~kidneyreg.simulate.anatomy`
(procedural abdomen), :mod:`~kidneyreg.simulate.ct` (CT rendering),
:mod:`~kidneyreg.simulate.real_anatomy` (label maps from a real CT),
:mod:`~kidneyreg.simulate.breathing`, :mod:`~kidneyreg.simulate.probe`,
:mod:`~kidneyreg.simulate.ultrasound` (B-mode rendering) and :mod:`~kidneyreg.simulate.case`
(case folders, ``kidneyreg simulate``).

The names below are re-exported lazily, so that importing a light module such as
``kidneyreg.simulate.tissues`` does not load the renderers.

Example:
    >>> from kidneyreg.simulate import simulate_case  # doctest: +SKIP
    >>> simulate_case("cases/case_000", seed=0, frames=20, profile="tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kidneyreg.simulate.anatomy import Anatomy, KidneyInfo, generate_anatomy
    from kidneyreg.simulate.breathing import BreathingMotion, BreathingParameters, RandomBreathing
    from kidneyreg.simulate.case import (
        SimulatedCase,
        simulate_case,
        simulate_case_data,
        simulate_cohort,
        write_case,
    )
    from kidneyreg.simulate.ct import render_ct
    from kidneyreg.simulate.probe import (
        ProbeGeometry,
        ProbeOffset,
        ProbePlacement,
        RandomProbeGeometry,
        RandomProbeOffset,
        place_probe,
    )
    from kidneyreg.simulate.real_anatomy import read_real_anatomy
    from kidneyreg.simulate.tissues import TISSUES, Tissue
    from kidneyreg.simulate.ultrasound import (
        AcousticParameters,
        RandomAcoustics,
        UltrasoundRenderer,
    )

_EXPORTS: dict[str, str] = {
    "Anatomy": "anatomy",
    "KidneyInfo": "anatomy",
    "generate_anatomy": "anatomy",
    "render_ct": "ct",
    "read_real_anatomy": "real_anatomy",
    "TISSUES": "tissues",
    "Tissue": "tissues",
    "BreathingMotion": "breathing",
    "BreathingParameters": "breathing",
    "RandomBreathing": "breathing",
    "ProbeGeometry": "probe",
    "ProbeOffset": "probe",
    "ProbePlacement": "probe",
    "RandomProbeGeometry": "probe",
    "RandomProbeOffset": "probe",
    "place_probe": "probe",
    "AcousticParameters": "ultrasound",
    "RandomAcoustics": "ultrasound",
    "UltrasoundRenderer": "ultrasound",
    "SimulatedCase": "case",
    "simulate_case": "case",
    "simulate_case_data": "case",
    "simulate_cohort": "case",
    "write_case": "case",
}

__all__ = [
    "TISSUES",
    "AcousticParameters",
    "Anatomy",
    "BreathingMotion",
    "BreathingParameters",
    "KidneyInfo",
    "ProbeGeometry",
    "ProbeOffset",
    "ProbePlacement",
    "RandomAcoustics",
    "RandomBreathing",
    "RandomProbeGeometry",
    "RandomProbeOffset",
    "SimulatedCase",
    "Tissue",
    "UltrasoundRenderer",
    "generate_anatomy",
    "place_probe",
    "read_real_anatomy",
    "render_ct",
    "simulate_case",
    "simulate_case_data",
    "simulate_cohort",
    "write_case",
]


def __getattr__(name: str) -> Any:
    """Import a re-exported name from its module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
