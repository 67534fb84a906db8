"""Label values of the label maps produced by every segmenter and the phantom ground truth.

A label map is a ``uint8`` array on the source CT grid, same shape and axis order as
:attr:`lungburden.dicom_io.volume.CTVolume.hu`.
"""

from __future__ import annotations

BACKGROUND = 0
#: Aerated lung parenchyma (not lesion). The lung field is labels 1, 2 and 3 together.
LUNG = 1
#: Ground-glass opacity (paper section 2.2: hazy increased attenuation, vessels preserved).
GGO = 2
#: High opacity = consolidation + pleural effusion (paper section 2.2).
HIGH_OPACITY = 3

LABEL_NAMES: dict[int, str] = {
    BACKGROUND: "background",
    LUNG: "lung",
    GGO: "ggo",
    HIGH_OPACITY: "high_opacity",
}
NUM_CLASSES = 4
