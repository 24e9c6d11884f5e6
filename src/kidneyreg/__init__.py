"""kidneyreg: deep 3D CT to 2D ultrasound kidney registration during free breathing.

A re-implementation and extension of KidneyRegNet (Chi et al., Sci. Rep. 13:12846, 2023).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
