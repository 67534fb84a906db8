"""What a phantom is: its specification, the generated volume and the codes shared by the
phantom modules (see ``docs/phantom.md``, "API" and "Conventions").

A :class:`PhantomSpec` fixes everything (the anatomy depends on the seed only); a
:class:`Phantom` holds the HU volume, the exact label map and the geometry. Array conventions
are those of :class:`~lungburden.dicom_io.volume.CTVolume`: axes ``(slice, row, column)``, the
first slice is the most superior, ``affine`` maps ``(slice, row, column, 1)`` to LPS millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Lesion kinds :func:`~lungburden.phantom.lesions.draw_lesions` knows (``PhantomSpec.lesion_kinds``).
LESION_KINDS: tuple[str, ...] = ("ggo", "consolidation", "effusion")
#: Codes of the ``lesion_kinds`` maps returned by the generators (not label values).
KIND_NONE, KIND_GGO, KIND_CONSOLIDATION, KIND_EFFUSION = 0, 1, 2, 3

#: HU range of the phantoms (12-bit stored values, rescale intercept -1024).
HU_MIN, HU_MAX = -1024, 3071


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate. Anatomy depends on ``seed`` only; the grid samples it in millimetres.

    ``pixel_spacing_mm=None`` means ``fov_mm / cols`` (0.78125 mm at 512 columns), so a smaller
    matrix shows the same anatomy coarser. ``burden_percent=None`` draws a burden from the
    seed (0 % for about one case in ten, otherwise up to 60 %, skewed to low values).
    """

    seed: int = 0
    slices: int = 64
    slice_spacing_mm: float = 5.0
    pixel_spacing_mm: float | None = None
    rows: int = 512
    cols: int = 512
    fov_mm: float = 400.0
    contrast: bool = False
    burden_percent: float | None = None
    lesion_kinds: frozenset[str] = frozenset(LESION_KINDS)
    #: Scale of the CT noise (1 = the seed's 10-25 HU; 0 = noiseless, for debugging).
    noise_scale: float = 1.0
    #: How far the scan range reaches above the lung apices (mm; the slab is centred on the range
    #: [lowest diaphragm - 25 mm, apices + neck_mm]). The shoulder girdle starts 45 mm below the
    #: apices, so any scan of the apices shows part of it; larger values add more of it and the
    #: root of the neck, where real chest CTs start.
    neck_mm: float = 20.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lesion_kinds", frozenset(self.lesion_kinds))
        unknown = set(self.lesion_kinds) - set(LESION_KINDS)
        if unknown:
            raise ValueError(f"unknown lesion kinds {sorted(unknown)}; known: {', '.join(LESION_KINDS)}")
        if self.slices < 1 or self.rows < 16 or self.cols < 16:
            raise ValueError("a phantom needs at least 1 slice and 16x16 pixels")
        if self.slice_spacing_mm <= 0 or (self.pixel_spacing_mm is not None and self.pixel_spacing_mm <= 0):
            raise ValueError("spacings must be positive")
        if self.burden_percent is not None and not 0.0 <= self.burden_percent <= 100.0:
            raise ValueError("burden_percent must lie in [0, 100]")
        object.__setattr__(self, "neck_mm", float(self.neck_mm))
        if not 0.0 <= self.neck_mm <= 300.0:
            raise ValueError("neck_mm must lie in [0, 300]")

    @property
    def pixel_spacing(self) -> float:
        """In-plane pixel size in mm, rounded so that it prints exactly as a DICOM DS."""
        ps = self.pixel_spacing_mm if self.pixel_spacing_mm is not None else self.fov_mm / self.cols
        return float(f"{ps:.6g}")

    def key(self) -> str:
        """Canonical text of the spec (UID entropy, provenance)."""
        kinds = ",".join(sorted(self.lesion_kinds))
        return (
            f"seed={self.seed};slices={self.slices};dz={self.slice_spacing_mm!r};ps={self.pixel_spacing!r};"
            f"rows={self.rows};cols={self.cols};contrast={self.contrast};burden={self.burden_percent!r};"
            f"kinds={kinds};noise={self.noise_scale!r}"
            + (f";neck={self.neck_mm!r}" if self.neck_mm != 20.0 else "")
        )


@dataclass(frozen=True, eq=False)
class Phantom:
    """A generated phantom: CT in HU, ground truth, geometry (see the module docstring)."""

    spec: PhantomSpec
    hu: np.ndarray  # int16 (slice, row, col)
    labels: np.ndarray  # uint8, values of lungburden.labels
    affine: np.ndarray  # 4x4, (slice, row, col, 1) -> LPS mm
    left_lung: np.ndarray  # bool, the patient's left lung (lung field labels 1-3)
    lesion_kinds: np.ndarray  # uint8, KIND_* codes
    burden_target_percent: float

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0
