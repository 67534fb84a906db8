"""Synthetic chest CT phantoms with exact ground truth (docs/phantom.md).

A :class:`PhantomSpec` (seed, slices, contrast, burden) gives a :class:`Phantom` (HU volume,
label map, affine) from :func:`generate_phantom`; :func:`write_phantom_series` writes it as a
DICOM CT series with ``labels.nii.gz`` and ``truth.json``. :func:`insert_lesions` paints
synthetic lesions into real CT (training data).

Modules: :mod:`~lungburden.phantom.spec` (the spec, the phantom, shared codes),
:mod:`~lungburden.phantom.anatomy` (the chest and :func:`generate_phantom`),
:mod:`~lungburden.phantom.lesions` (lesions, real-CT insertion) and
:mod:`~lungburden.phantom.dicom` (truth, UIDs, the DICOM series).
"""

from lungburden.phantom.anatomy import generate_phantom
from lungburden.phantom.dicom import phantom_quantities, write_phantom_series
from lungburden.phantom.lesions import insert_lesions, lps_from_ras, lung_mask_from_hu
from lungburden.phantom.spec import (
    KIND_CONSOLIDATION,
    KIND_EFFUSION,
    KIND_GGO,
    LESION_KINDS,
    Phantom,
    PhantomSpec,
)

__all__ = [
    "KIND_CONSOLIDATION",
    "KIND_EFFUSION",
    "KIND_GGO",
    "LESION_KINDS",
    "Phantom",
    "PhantomSpec",
    "generate_phantom",
    "insert_lesions",
    "lps_from_ras",
    "lung_mask_from_hu",
    "phantom_quantities",
    "write_phantom_series",
]
