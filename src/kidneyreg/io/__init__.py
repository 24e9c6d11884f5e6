"""Medical image input and output: CT volumes, masks, U/S sequences, transforms.

The public names of :mod:`kidneyreg.io.image`, :mod:`kidneyreg.io.us` and
:mod:`kidneyreg.io.transforms` are re-exported here. pydicom and imageio are imported only when a
DICOM or video/PNG input is actually read, so importing this package stays light.
"""

from kidneyreg.io.image import read_ct, read_image, read_mask, write_image, write_mask
from kidneyreg.io.transforms import (
    CONVENTION,
    TransformSequence,
    read_parameters_csv,
    read_tfm,
    read_transforms_json,
    write_parameters_csv,
    write_tfm,
    write_transforms_json,
)
from kidneyreg.io.us import (
    UltrasoundSequence,
    read_us_mask,
    read_us_sequence,
    write_us_sequence,
)

__all__ = [
    "CONVENTION",
    "TransformSequence",
    "UltrasoundSequence",
    "read_ct",
    "read_image",
    "read_mask",
    "read_parameters_csv",
    "read_tfm",
    "read_transforms_json",
    "read_us_mask",
    "read_us_sequence",
    "write_image",
    "write_mask",
    "write_parameters_csv",
    "write_tfm",
    "write_transforms_json",
    "write_us_sequence",
]
