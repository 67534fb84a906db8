"""Training and evaluation data: sources, preprocessed-case cache, windows and augmentation.

Sources (each yields :class:`RawCase`: HU, labels and LPS affine on the source grid):

- :class:`PhantomSource` — synthetic chest CT (:mod:`lungburden.phantom`) with varied
  anatomy, lesion patterns, burden 0 to ~80 %, contrast and non-contrast, slice thickness
  0.625-5 mm, generated in memory at a modest matrix (default 256 × 256);
- :class:`RealCTSource` — real CT volumes (``$LUNGBURDEN_DATA/real-ct``: the TotalSegmentator
  chest crops, optionally the Lung-PET-CT-Dx study) with synthetic GGO / consolidation / effusion
  inserted; the lung class comes from
  :func:`~lungburden.segmentation.threshold.lung_field_mask`;
- :class:`NiftiPairSource` — users' NIfTI image/mask pairs in the MedSeg, MosMedData,
  COVID-19-CT-Seg or a generic layout, with a configurable label map;
- :class:`DicomSegSource` — DICOM CT series + DICOM SEG pairs (e.g. radiologist-corrected SEGs
  written by lungburden itself), segments mapped to classes by property type code or label.

A :class:`TrainingCase` is the case after the product's own preprocessing
(:func:`lungburden.segmentation.preprocess.preprocess`, section 2.4 — never re-implemented here):
``image`` float16 ``(slices, S, S)`` in [0, 1] and ``labels`` uint8 on the same model grid.
Cases are cached as ``.npz`` in a cache folder keyed by everything that determines them.

:class:`WindowSampler` draws ``(case, slice)`` targets, :func:`make_batch` cuts the
``2·context+1``-slice windows (edge policy of the segmenter: replicate), and
:func:`augment_batch` applies the section 2.4 augmentation (rotation ±10°, translation ±10 px of
the paper's 256 grid, scale 0.9-1.05) identically to all slices of a window and to its label.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lungburden import labels as L

if TYPE_CHECKING:
    from lungburden.dicom_io.volume import CTVolume

log = logging.getLogger(__name__)

#: Bump when the meaning of a cached case changes (cache keys include it).
DATA_VERSION = 1
#: Environment variable naming the data root: a folder with ``real-ct/`` (real CT volumes and
#: studies) and ``real-covid-slices/`` (real slices with expert masks), read in place.
DATA_ENV = "LUNGBURDEN_DATA"


def data_root(given: str | os.PathLike[str] | None = None) -> Path | None:
    """The data root: ``given`` (a ``--data-root`` option), else ``$LUNGBURDEN_DATA``, else None."""
    value = str(given or os.environ.get(DATA_ENV, "")).strip()
    return Path(value).expanduser() if value else None


def default_real_ct(given_root: str | os.PathLike[str] | None = None) -> Path | None:
    """``<data root>/real-ct`` (:func:`data_root`) when it exists, else None."""
    root = data_root(given_root)
    return root / "real-ct" if root is not None and (root / "real-ct").is_dir() else None

#: The real non-COVID study: the specificity test case (see :class:`RealCTSource`).
REAL_STUDY = "lung-pet-ct-dx-A0001"
#: HU above which a voxel of a "lesion" label (GGO and consolidation not distinguished) is high opacity.
LESION_SPLIT_HU = -300.0


def default_cache_dir() -> Path:
    """``$LUNGBURDEN_CACHE`` or ``~/.cache/lungburden/cases``."""
    env = os.environ.get("LUNGBURDEN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lungburden" / "cases"


# --------------------------------------------------------------------------------------------------
# Cases


@dataclass(eq=False)
class RawCase:
    """One case on its source grid: HU ``float32 (slice, row, col)``, labels ``uint8`` (labels.py),
    ``affine`` mapping ``(slice, row, col, 1)`` to LPS mm (the :class:`CTVolume` convention)."""

    case_id: str
    hu: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def to_volume(self):
        """The case as a :class:`~lungburden.dicom_io.volume.CTVolume` (no DICOM headers), so that
        evaluation runs exactly the product's ``segment`` path."""
        from lungburden.dicom_io.volume import CTVolume

        return CTVolume(
            hu=np.ascontiguousarray(self.hu, dtype=np.float32),
            affine=np.asarray(self.affine, dtype=np.float64),
            datasets=(),
            series_instance_uid=f"case:{self.case_id}",
            study_instance_uid=f"case:{self.case_id}",
            frame_of_reference_uid="",
        )


@dataclass(eq=False)
class TrainingCase:
    """A preprocessed case on the model grid (section 2.4).

    ``image`` float16 ``(slices, S, S)`` in [0, 1]; ``labels`` uint8 ``(slices, S, S)``;
    ``meta``: case id, source, spacing, truth burden, crop box.
    """

    case_id: str
    image: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])

    @property
    def size(self) -> int:
        return int(self.image.shape[-1])


class CaseSource(Protocol):
    """A collection of cases addressed by id (ids are unique across sources, prefixed by the source)."""

    name: str

    def case_ids(self) -> list[str]: ...

    def load(self, case_id: str) -> RawCase: ...

    def cache_key(self, case_id: str) -> str:
        """A string that changes whenever the content of the case would change."""
        ...


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


@lru_cache(maxsize=8)
def _module_digest(module_name: str) -> str:
    """Digest of a module's source, or of every source file of a package (so cached synthetic
    cases follow generator changes)."""
    import importlib.util

    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return "missing"
    origin = Path(spec.origin)
    files = sorted(origin.parent.glob("*.py")) if origin.name == "__init__.py" else [origin]
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def finalize_labels(lesions: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Combine a lesion label map (0, GGO, HIGH_OPACITY) and a lung mask into the 4-class map.

    Lung field = lung mask ∪ lesions; lesion labels win over lung (section 2.3: the lung volume
    includes the lesions).
    """
    out = np.where(lung, np.uint8(L.LUNG), np.uint8(L.BACKGROUND)).astype(np.uint8)
    out[lesions == L.GGO] = L.GGO
    out[lesions == L.HIGH_OPACITY] = L.HIGH_OPACITY
    return out


def lung_mask_for(hu: np.ndarray, spacing: Sequence[float], cropped_inside_body: bool = False) -> np.ndarray:
    """Lung field of a real volume by :func:`~lungburden.segmentation.threshold.lung_field_mask`.

    ``cropped_inside_body``: the volume is a crop whose in-plane borders cut through the body and
    the lungs (the TotalSegmentator crops); the lung field rule drops air touching the border, so
    the volume is padded in-plane with soft tissue (40 HU) first.
    """
    from lungburden.segmentation.threshold import lung_field_mask

    spacing = tuple(float(s) for s in spacing)
    if not cropped_inside_body:
        return lung_field_mask(hu, spacing)  # type: ignore[arg-type]
    p = 4
    padded = np.pad(hu, ((0, 0), (p, p), (p, p)), constant_values=40.0)
    return lung_field_mask(padded, spacing)[:, p:-p, p:-p]  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Label maps of users' data


#: Target classes of a label map entry. "lesion" = GGO and consolidation not distinguished: split
#: by HU at :data:`LESION_SPLIT_HU`.
TARGETS = {
    "background": L.BACKGROUND, "bg": L.BACKGROUND, "ignore": L.BACKGROUND,
    "lung": L.LUNG,
    "ggo": L.GGO, "ground_glass": L.GGO,
    "high": L.HIGH_OPACITY, "high_opacity": L.HIGH_OPACITY, "consolidation": L.HIGH_OPACITY,
    "effusion": L.HIGH_OPACITY,
    "lesion": -1,
}


def parse_label_map(text: str) -> dict[int, str]:
    """``"1:ggo,2:high,3:high"`` → ``{1: "ggo", 2: "high", 3: "high"}`` (targets: :data:`TARGETS`)."""
    out: dict[int, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        try:
            value, target = (s.strip() for s in item.split(":", 1))
            key = int(value)
        except ValueError:
            raise ValueError(f"label map entry {item!r} is not VALUE:CLASS (e.g. 1:ggo)") from None
        target = target.lower()
        if target not in TARGETS:
            raise ValueError(f"label map entry {item!r}: unknown class {target!r}; use one of "
                             f"{', '.join(sorted(set(TARGETS)))}")
        out[key] = target
    if not out:
        raise ValueError(f"empty label map {text!r}")
    return out


def apply_label_map(mask: np.ndarray, label_map: dict[int, str], hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map a dataset mask to ``(lesions, lung)``: lesion label map (0/GGO/HIGH) and lung mask.

    Values absent from the map raise (a misconfigured map must not train silently wrong);
    "lesion" voxels are GGO at HU <= :data:`LESION_SPLIT_HU`, high opacity above.
    """
    values = {int(v) for v in np.unique(mask)} - {0}
    unknown = sorted(values - set(label_map))
    if unknown:
        raise ValueError(f"mask values {unknown} are not in the label map {label_map}; add them (e.g. "
                         f"'{unknown[0]}:background' to drop them)")
    lesions = np.zeros(mask.shape, np.uint8)
    lung = np.zeros(mask.shape, bool)
    for value, target in label_map.items():
        sel = mask == value
        code = TARGETS[target]
        if code == L.LUNG:
            lung |= sel
        elif code in (L.GGO, L.HIGH_OPACITY):
            lesions[sel] = np.maximum(lesions[sel], code)
        elif code == -1:
            lesions[sel & (hu <= LESION_SPLIT_HU)] = np.maximum(lesions[sel & (hu <= LESION_SPLIT_HU)], L.GGO)
            lesions[sel & (hu > LESION_SPLIT_HU)] = L.HIGH_OPACITY
    return lesions, lung


def label_map_has_lung(label_map: dict[int, str]) -> bool:
    return any(TARGETS[t] == L.LUNG for t in label_map.values())


# --------------------------------------------------------------------------------------------------
# NIfTI


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume in the :class:`CTVolume` convention: array ``(slice, row, col)`` with
    slices from head to feet, rows anterior→posterior, columns right→left, and its LPS affine
    (highdicom converts from NIfTI's RAS and reorients to "FPL")."""
    import highdicom as hd
    import nibabel as nib

    img = nib.load(str(path))
    array = np.asarray(img.dataobj)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {array.shape}")
    vol = hd.Volume(array=array, affine=img.affine, coordinate_system="PATIENT", from_reference_convention="RAS")
    vol = vol.to_patient_orientation("FPL")
    return np.ascontiguousarray(vol.array), np.asarray(vol.affine, dtype=np.float64)


def write_nifti(path: Path, array: np.ndarray, affine_lps: np.ndarray) -> Path:
    """Write a ``(slice, row, col)`` array with an LPS affine as NIfTI (inverse of :func:`read_nifti`)."""
    import nibabel as nib

    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    nib.save(nib.Nifti1Image(np.asarray(array), ras), str(path))
    return path


_NII = (".nii.gz", ".nii")


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_NII))


def _stem(path: Path) -> str:
    name = path.name
    for ext in _NII:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _subdir(root: Path, *names: str) -> Path | None:
    """The first existing child of ``root`` whose name matches one of ``names`` (case-insensitive)."""
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    for n in names:
        if n.lower() in children:
            return children[n.lower()]
    return None


@dataclass(frozen=True)
class NiftiPair:
    case_id: str
    image: Path
    mask: Path
    lung: Path | None = None


@dataclass(frozen=True)
class NiftiLayout:
    """A public dataset layout: where images, lesion masks and (optional) lung masks are, and the
    default label map of its masks."""

    name: str
    default_label_map: str
    find: Callable[[Path], list[NiftiPair]]
    description: str


def _pair_by_stem(images: list[Path], masks: dict[str, Path], lungs: dict[str, Path],
                  norm: Callable[[str], str], prefix: str) -> list[NiftiPair]:
    pairs = []
    for img in images:
        key = norm(_stem(img))
        if key in masks:
            pairs.append(NiftiPair(f"{prefix}-{key}", img, masks[key], lungs.get(key)))
    return pairs


def _find_medseg(root: Path) -> list[NiftiPair]:
    """MedSeg COVID-19 CT segmentation (medicalsegmentation.com): ``rp_im/N.nii.gz``,
    ``rp_msk/N.nii.gz`` (1 GGO, 2 consolidation, 3 pleural effusion), ``rp_lung_msk/N.nii.gz``."""
    im, msk, lung = _subdir(root, "rp_im"), _subdir(root, "rp_msk"), _subdir(root, "rp_lung_msk")
    if im is None or msk is None:
        raise FileNotFoundError(f"{root}: MedSeg layout needs rp_im/ and rp_msk/ (the 2-D tr_im set is not used)")
    masks = {_stem(p): p for p in _nifti_files(msk)}
    lungs = {_stem(p): p for p in _nifti_files(lung)} if lung else {}
    return _pair_by_stem(_nifti_files(im), masks, lungs, str, "medseg")


def _find_mosmed(root: Path) -> list[NiftiPair]:
    """MosMedData COVID19_1110: ``studies/CT-*/study_NNNN.nii.gz`` and ``masks/study_NNNN_mask.nii.gz``
    (1 = lesion: GGO and consolidation not distinguished; only CT-1 studies have masks)."""
    studies, msk = _subdir(root, "studies"), _subdir(root, "masks")
    if studies is None or msk is None:
        raise FileNotFoundError(f"{root}: MosMedData layout needs studies/ and masks/")
    images = [p for d in sorted(x for x in studies.iterdir() if x.is_dir()) for p in _nifti_files(d)]
    images += _nifti_files(studies)
    masks = {re.sub(r"_mask$", "", _stem(p)): p for p in _nifti_files(msk)}
    return _pair_by_stem(images, masks, {}, str, "mosmed")


def _find_covid19ctseg(root: Path) -> list[NiftiPair]:
    """COVID-19-CT-Seg (Ma et al., Zenodo 3757476; also the Kaggle copy): images in
    ``COVID-19-CT-Seg_20cases/`` (or ``ct_scans/``), ``Infection_Mask/`` (1 = infection),
    ``Lung_Mask/`` (1 left, 2 right lung); Kaggle's ``_org_`` / ``_org_covid-19-pneumonia-``
    name parts are ignored when pairing."""
    im = _subdir(root, "COVID-19-CT-Seg_20cases", "ct_scans", "images")
    msk = _subdir(root, "Infection_Mask")
    lung = _subdir(root, "Lung_Mask")
    if im is None or msk is None:
        raise FileNotFoundError(f"{root}: COVID-19-CT-Seg layout needs COVID-19-CT-Seg_20cases/ (or ct_scans/) "
                                "and Infection_Mask/")

    def norm(s: str) -> str:
        return re.sub(r"_org_covid-19-pneumonia-|_org_", "_", s).lower()

    masks = {norm(_stem(p)): p for p in _nifti_files(msk)}
    lungs = {norm(_stem(p)): p for p in _nifti_files(lung)} if lung else {}
    return _pair_by_stem(_nifti_files(im), masks, lungs, norm, "c19seg")


def _find_generic(root: Path) -> list[NiftiPair]:
    """Generic: ``images/X.nii.gz`` + ``masks/X.nii.gz`` (or ``labels/``; nnU-Net ``imagesTr/X_0000`` +
    ``labelsTr/X`` too) + optional ``lungs/X.nii.gz``; default map = lungburden's own labels."""
    im = _subdir(root, "images", "imagesTr")
    msk = _subdir(root, "masks", "labels", "labelsTr")
    lung = _subdir(root, "lungs", "lung_masks")
    if im is None or msk is None:
        raise FileNotFoundError(f"{root}: generic layout needs images/ and masks/ (or labels/)")

    def norm(s: str) -> str:
        return re.sub(r"_0000$", "", s)

    masks = {norm(_stem(p)): p for p in _nifti_files(msk)}
    lungs = {norm(_stem(p)): p for p in _nifti_files(lung)} if lung else {}
    return _pair_by_stem(_nifti_files(im), masks, lungs, norm, f"nifti-{root.name}")


LAYOUTS: dict[str, NiftiLayout] = {
    "medseg": NiftiLayout("medseg", "1:ggo,2:high,3:high", _find_medseg, _find_medseg.__doc__ or ""),
    "mosmed": NiftiLayout("mosmed", "1:lesion", _find_mosmed, _find_mosmed.__doc__ or ""),
    "covid19ctseg": NiftiLayout("covid19ctseg", "1:lesion", _find_covid19ctseg, _find_covid19ctseg.__doc__ or ""),
    "generic": NiftiLayout("generic", "1:lung,2:ggo,3:high", _find_generic, _find_generic.__doc__ or ""),
}


def looks_like_hu(hu: np.ndarray) -> bool:
    """False for images without air below -500 (e.g. rescaled to 0-255: some public cases are not in HU)."""
    return float(np.percentile(hu, 0.5)) < -500


class NiftiPairSource:
    """Users' NIfTI image/mask pairs in one of :data:`LAYOUTS`.

    Lung: from the layout's lung masks (any non-zero value) when present, else from the label map
    when it has a lung class, else :func:`lung_mask_for` (``lung_field_mask``). Images that are
    not in HU are skipped with a warning.
    """

    def __init__(self, root: Path, layout: str = "generic", label_map: str | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown NIfTI layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        self.root = Path(root)
        self.layout = LAYOUTS[layout]
        self.label_map_text = label_map or self.layout.default_label_map
        self.label_map = parse_label_map(self.label_map_text)
        self.name = f"nifti:{layout}:{self.root}"
        self.pairs = {p.case_id: p for p in self.layout.find(self.root)}
        if not self.pairs:
            raise FileNotFoundError(f"{self.root}: no image/mask pairs found in the {layout} layout")

    def case_ids(self) -> list[str]:
        return sorted(self.pairs)

    def cache_key(self, case_id: str) -> str:
        p = self.pairs[case_id]
        stamps = [_file_stamp(x) for x in (p.image, p.mask, p.lung) if x is not None]
        return json.dumps([self.layout.name, self.label_map_text, stamps,
                           _module_digest("lungburden.segmentation.threshold")])

    def load(self, case_id: str) -> RawCase:
        p = self.pairs[case_id]
        hu, affine = read_nifti(p.image)
        hu = hu.astype(np.float32)
        mask, mask_affine = read_nifti(p.mask)
        if mask.shape != hu.shape:
            raise ValueError(f"{p.mask}: shape {mask.shape} differs from the image {hu.shape}")
        if not np.allclose(mask_affine, affine, atol=1e-2):
            log.warning("%s: affine differs from the image's; using the image grid", p.mask)
        if not looks_like_hu(hu):
            raise ValueError(f"{p.image}: intensities {hu.min():.0f}..{hu.max():.0f} are not Hounsfield units")
        mask = np.rint(mask).astype(np.int32)
        lesions, lung = apply_label_map(mask, self.label_map, hu)
        if p.lung is not None:
            lung_img, _ = read_nifti(p.lung)
            lung = lung | (lung_img > 0)
        elif not label_map_has_lung(self.label_map):
            lung = lung_mask_for(hu, np.linalg.norm(affine[:3, :3], axis=0))
        labels = finalize_labels(lesions, lung)
        return RawCase(case_id, hu, labels, affine, source=f"nifti-{self.layout.name}",
                       meta={"image": str(p.image), "mask": str(p.mask)})


# --------------------------------------------------------------------------------------------------
# DICOM CT + DICOM SEG


#: Segmented property type codes → class (lungburden's own SEG uses the first three; see results/seg.py).
SEG_CODE_TARGETS: dict[tuple[str, str], str] = {
    ("SCT", "39607008"): "lung",  # Lung
    ("SCT", "44029006"): "lung",  # Left lung
    ("SCT", "3341006"): "lung",  # Right lung
    ("DCM", "112120"): "ggo",  # Ground glass opacity
    ("SCT", "95436008"): "high",  # Lung consolidation
    ("SCT", "60046008"): "high",  # Pleural effusion
    ("DCM", "112033"): "lesion",  # Abnormal opacity
}
_SEG_LABEL_WORDS = (("ground", "ggo"), ("ggo", "ggo"), ("consolidation", "high"), ("effusion", "high"),
                    ("high", "high"), ("lesion", "lesion"), ("infection", "lesion"), ("lung", "lung"))


def parse_seg_map(text: str | None) -> dict[str, str]:
    """``"3:high,Ground glass:ggo,SCT-95436008:high"``: keys are segment numbers, labels or
    ``SCHEME-VALUE`` codes (case-insensitive), values classes of :data:`TARGETS`."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        if ":" not in item:
            raise ValueError(f"SEG map entry {item!r} is not KEY:CLASS")
        key, target = (s.strip() for s in item.rsplit(":", 1))
        if target.lower() not in TARGETS:
            raise ValueError(f"SEG map entry {item!r}: unknown class {target!r}")
        out[key.lower()] = target.lower()
    return out


def segment_target(number: int, label: str, scheme: str, value: str, overrides: dict[str, str]) -> str | None:
    """Class of a SEG segment: user overrides (number, label, code), then the property type code,
    then words of the segment label; ``None`` = ignored segment."""
    for key in (str(number), label.lower(), f"{scheme}-{value}".lower()):
        if key in overrides:
            return overrides[key]
    if (scheme, value) in SEG_CODE_TARGETS:
        return SEG_CODE_TARGETS[(scheme, value)]
    low = label.lower()
    for word, target in _SEG_LABEL_WORDS:
        if word in low:
            return target
    return None


class DicomSegSource:
    """DICOM SEG instances under a folder, each with its referenced CT series (same folder tree).

    The segments are read with highdicom onto the CT grid (by source instance; frames are
    matched to CT slices through the Derivation Image references) and mapped by
    :func:`segment_target`; overlaps resolve high opacity > GGO > lung. Without a lung segment,
    the lung comes from ``lung_field_mask``.
    """

    def __init__(self, root: Path, seg_map: str | None = None):
        from lungburden.dicom_io.series import discover_series

        self.root = Path(root)
        self.name = f"dicom-seg:{self.root}"
        self.seg_map_text = seg_map or ""
        self.overrides = parse_seg_map(seg_map)
        candidates = discover_series(self.root)
        self._ct = {c.series_instance_uid: c for c in candidates if c.first.get("Modality") == "CT"}
        self.cases: dict[str, tuple[Path, str]] = {}
        for c in candidates:
            if c.first.get("Modality") != "SEG":
                continue
            for path, header in zip(c.files, c.headers, strict=True):
                refs = header.get("ReferencedSeriesSequence", [])
                ref_uid = str(refs[0].SeriesInstanceUID) if refs else ""
                if ref_uid not in self._ct:
                    log.warning("%s: referenced CT series %s not found under %s; skipped", path, ref_uid, self.root)
                    continue
                self.cases[f"seg-{header.SOPInstanceUID}"] = (path, ref_uid)
        if not self.cases:
            raise FileNotFoundError(f"{self.root}: no DICOM SEG with its CT series found")

    def case_ids(self) -> list[str]:
        return sorted(self.cases)

    def cache_key(self, case_id: str) -> str:
        path, ref = self.cases[case_id]
        return json.dumps([_file_stamp(path), ref, len(self._ct[ref].files), self.seg_map_text])

    def load(self, case_id: str) -> RawCase:
        import highdicom as hd

        from lungburden.dicom_io.volume import load_files

        path, ref = self.cases[case_id]
        volume = load_files(self._ct[ref].files)
        seg = hd.seg.segread(str(path))
        sop_uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
        lesions = np.zeros(volume.shape, np.uint8)
        lung = np.zeros(volume.shape, bool)
        found_lung = False
        mapped = []
        for number in seg.get_segment_numbers():
            desc = seg.get_segment_description(number)
            code = desc.segmented_property_type
            target = segment_target(number, str(desc.segment_label), code.scheme_designator, code.value,
                                    self.overrides)
            if target is None or TARGETS[target] == L.BACKGROUND:
                log.info("%s: segment %d (%s) ignored", path, number, desc.segment_label)
                continue
            mask = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=sop_uids, segment_numbers=[number], combine_segments=False,
                assert_missing_frames_are_empty=True,
            )[..., 0] > 0
            mapped.append(f"{number}:{target}")
            code_value = TARGETS[target]
            if code_value == L.LUNG:
                lung |= mask
                found_lung = True
            elif code_value == -1:
                lesions[mask & (volume.hu <= LESION_SPLIT_HU) & (lesions == 0)] = L.GGO
                lesions[mask & (volume.hu > LESION_SPLIT_HU)] = L.HIGH_OPACITY
            else:
                lesions[mask] = np.maximum(lesions[mask], code_value)
        if not found_lung:
            lung = lung_mask_for(volume.hu, volume.spacing)
        labels = finalize_labels(lesions, lung)
        return RawCase(case_id, volume.hu, labels, volume.affine, source="dicom-seg",
                       meta={"seg": str(path), "ct_series": ref, "segments": mapped})


# --------------------------------------------------------------------------------------------------
# Synthetic phantoms


#: Slice thicknesses sampled for phantoms (mm) and their weights (thin and 5 mm reconstructions).
PHANTOM_SPACINGS = (0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0)
PHANTOM_SPACING_WEIGHTS = (0.12, 0.12, 0.16, 0.12, 0.16, 0.12, 0.20)


def sample_phantom_spec(seed: int, matrix: int = 256, max_slices: int = 96):
    """A varied :class:`~lungburden.phantom.PhantomSpec` drawn from ``seed``.

    Slice thickness from :data:`PHANTOM_SPACINGS`; at most ``max_slices`` slices (thin
    reconstructions cover a slab of the chest); contrast in half the cases; burden 0 in ~15 % of
    cases, otherwise 80·u^1.5 % (more low-burden cases, as in clinical cohorts); lesion kinds all
    three in 70 % of cases, else GGO only / consolidation only / GGO + effusion; field of view
    320-450 mm on a ``matrix`` × ``matrix`` grid; noise 0.6-1.5 × the seed's; the scan range
    reaches 20 mm above the lung apices in 40 % of cases, else 25-70 mm (more of the shoulder
    girdle and the root of the neck, as in real chest CTs; thin-slice slabs of the mid-chest
    seldom reach the apices either way).
    """
    from lungburden.phantom import LESION_KINDS, PhantomSpec

    rng = np.random.default_rng([seed, 0x1B])
    spacing = float(rng.choice(PHANTOM_SPACINGS, p=np.asarray(PHANTOM_SPACING_WEIGHTS) / sum(PHANTOM_SPACING_WEIGHTS)))
    chest_mm = float(rng.uniform(240, 330))
    slices = int(min(max_slices, max(24, round(chest_mm / spacing))))
    burden = 0.0 if rng.random() < 0.15 else float(80.0 * rng.random() ** 1.5)
    u = rng.random()
    kinds = (frozenset(LESION_KINDS) if u < 0.7 else frozenset({"ggo"}) if u < 0.8
             else frozenset({"consolidation"}) if u < 0.9 else frozenset({"ggo", "effusion"}))
    wanted = dict(seed=seed, slices=slices, slice_spacing_mm=spacing, rows=matrix, cols=matrix,
                  fov_mm=float(rng.uniform(320, 450)), contrast=bool(rng.random() < 0.5), burden_percent=burden,
                  lesion_kinds=kinds, noise_scale=float(rng.uniform(0.6, 1.5)))
    # Drawn from its own stream so that the other fields stay those of earlier versions.
    extra = np.random.default_rng([seed, 0x2E])
    wanted["neck_mm"] = 20.0 if extra.random() < 0.4 else float(extra.uniform(25, 70))
    names = {f.name for f in dataclasses.fields(PhantomSpec)}
    return PhantomSpec(**{k: v for k, v in wanted.items() if k in names})


class PhantomSource:
    """Synthetic chest CT phantoms, one per seed (see :func:`sample_phantom_spec`).

    Training seeds start at 1000 by convention; evaluation uses seeds 1-100 (disjoint).
    """

    def __init__(self, seeds: Sequence[int], matrix: int = 256, max_slices: int = 96):
        self.seeds = [int(s) for s in seeds]
        self.matrix = matrix
        self.max_slices = max_slices
        self.name = "phantom"

    def case_ids(self) -> list[str]:
        return [f"phantom-{s}" for s in self.seeds]

    def _seed(self, case_id: str) -> int:
        return int(case_id.rsplit("-", 1)[1])

    def cache_key(self, case_id: str) -> str:
        spec = sample_phantom_spec(self._seed(case_id), self.matrix, self.max_slices)
        return json.dumps([case_id, spec.key(), _module_digest("lungburden.phantom")])

    def load(self, case_id: str) -> RawCase:
        from lungburden.phantom import generate_phantom

        spec = sample_phantom_spec(self._seed(case_id), self.matrix, self.max_slices)
        ph = generate_phantom(spec)
        meta = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else ",".join(sorted(v))
                    if isinstance(v, frozenset) else str(v)) for k, v in dataclasses.asdict(spec).items()}
        return RawCase(case_id, np.asarray(ph.hu, np.float32), np.asarray(ph.labels, np.uint8),
                       np.asarray(ph.affine, np.float64), source="phantom", meta=meta)


# --------------------------------------------------------------------------------------------------
# Real CT with inserted synthetic lesions


@dataclass(frozen=True)
class RealVolume:
    """A real CT volume usable as an anatomical background."""

    name: str
    path: Path
    kind: str  # "nifti-crop" | "dicom"


def find_real_volumes(root: Path, include_study: bool = False) -> list[RealVolume]:
    """The TotalSegmentator crops (``*.nii.gz``) and, with ``include_study``, the lung-kernel
    series of the Lung-PET-CT-Dx study under ``root`` (the shared ``real-ct`` folder)."""
    root = Path(root)
    out = [RealVolume(_stem(p), p, "nifti-crop")
           for p in sorted((root / "totalsegmentator-chest-crops").glob("*.nii*"))]
    study = root / REAL_STUDY / "lung-kernel-L-5mm"
    if include_study and study.is_dir():
        out.append(RealVolume(REAL_STUDY, study, "dicom"))
    return out


def tumour_boxes(study_root: Path) -> dict[float, list[tuple[int, int, int, int]]]:
    """Tumour bounding boxes of the Lung-PET-CT-Dx study by slice z (mm): ``(xmin, ymin, xmax, ymax)``.

    The XML files are named by the SOPInstanceUID of the annotated slice, in either kernel's
    series (same positions); boxes are returned by ImagePositionPatient z.
    """
    import pydicom

    annotations = {p.stem: p for p in (study_root / "tumor-annotations").glob("*.xml")}
    boxes: dict[float, list[tuple[int, int, int, int]]] = {}
    for series in sorted(study_root.iterdir()):
        if not series.is_dir() or series.name == "tumor-annotations":
            continue
        for f in sorted(series.glob("*.dcm")):
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "ImagePositionPatient"])
            xml = annotations.get(str(ds.SOPInstanceUID))
            if xml is None:
                continue
            z = round(float(ds.ImagePositionPatient[2]), 2)
            for bb in ET.parse(xml).getroot().iter("bndbox"):
                box = tuple(int(float(bb.findtext(k, "0"))) for k in ("xmin", "ymin", "xmax", "ymax"))
                if box not in boxes.setdefault(z, []):
                    boxes[z].append(box)  # type: ignore[arg-type]
    return boxes


def tumour_box_mask(volume: CTVolume, study_root: Path) -> np.ndarray:
    """Boolean mask of the Lung-PET-CT-Dx tumour boxes (:func:`tumour_boxes`) on ``volume``'s grid."""
    mask = np.zeros(volume.shape, bool)
    z_of_slice = {round(float(ds.ImagePositionPatient[2]), 2): k for k, ds in enumerate(volume.datasets)}
    for z, boxes in tumour_boxes(study_root).items():
        k = z_of_slice.get(z)
        for x0, y0, x1, y1 in boxes if k is not None else []:
            mask[k, y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def tumour_region(volume: CTVolume, study_root: Path) -> np.ndarray:
    """The tumour boxes extended by one slice above and below: outside this region, opacity in
    that study is a false positive."""
    from scipy import ndimage

    return ndimage.binary_dilation(tumour_box_mask(volume, study_root), structure=np.ones((3, 1, 1), bool))


def study_tumour_labels(volume, study_root: Path, lung: np.ndarray) -> np.ndarray:
    """Approximate mask of the real study's tumour: voxels > :data:`LESION_SPLIT_HU` inside the
    annotated boxes and inside the lung field (the tumour is a genuine high-opacity finding; the
    boxes also hold chest wall and aorta, hence the lung field restriction; see docs/training.md)."""
    return tumour_box_mask(volume, study_root) & (volume.hu > LESION_SPLIT_HU) & lung


@lru_cache(maxsize=4)
def load_real_background(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(hu float32, affine, lung mask, high-opacity mask of existing findings)`` of a real volume."""
    if kind == "dicom":
        from lungburden.dicom_io.volume import load_files

        volume = load_files(sorted(Path(path).glob("*.dcm")))
        lung = lung_mask_for(volume.hu, volume.spacing)
        tumour = study_tumour_labels(volume, Path(path).parent, lung)
        return volume.hu, volume.affine, lung, tumour
    hu, affine = read_nifti(Path(path))
    hu = hu.astype(np.float32)
    lung = lung_mask_for(hu, np.linalg.norm(affine[:3, :3], axis=0), cropped_inside_body=True)
    return hu, affine, lung, np.zeros(hu.shape, bool)


class RealCTSource:
    """Real CT volumes with synthetic lesions inserted (``variants`` seeds per volume).

    Lung = ``lung_field_mask`` (crops padded in-plane, see :func:`lung_mask_for`); lesions from
    the phantom module's insertion function. The real Lung-PET-CT-Dx study is the specificity
    test case and is **not** used unless ``include_study`` (then its tumour, inside the annotated
    boxes, is labelled high opacity). ``variants=0`` with ``clean=True`` gives the volumes without
    inserted lesions (evaluation of specificity).
    """

    def __init__(self, root: Path, variants: int = 8, seed_start: int = 1000, include_study: bool = False,
                 clean: bool = False):
        self.root = Path(root)
        self.volumes = {v.name: v for v in find_real_volumes(self.root, include_study)}
        if not self.volumes:
            raise FileNotFoundError(f"{self.root}: no real CT volumes found")
        self.variants = variants
        self.seed_start = seed_start
        self.clean = clean
        self.name = f"real-ct:{self.root}"

    def case_ids(self) -> list[str]:
        ids = []
        for name in sorted(self.volumes):
            if self.clean:
                ids.append(f"real-{name}-clean")
            ids += [f"real-{name}-s{self.seed_start + i}" for i in range(self.variants)]
        return ids

    def _parse(self, case_id: str) -> tuple[RealVolume, int | None]:
        body = case_id[len("real-"):]
        name, _, tail = body.rpartition("-")
        seed = None if tail == "clean" else int(tail[1:])
        return self.volumes[name], seed

    def cache_key(self, case_id: str) -> str:
        vol, _ = self._parse(case_id)
        path = vol.path if vol.kind != "dicom" else vol.path / "1-01.dcm"
        return json.dumps([case_id, _file_stamp(path) if path.exists() else str(path),
                           _module_digest("lungburden.phantom"),
                           _module_digest("lungburden.segmentation.threshold")])

    def load(self, case_id: str) -> RawCase:
        vol, seed = self._parse(case_id)
        hu, affine, lung, existing = load_real_background(vol.path, vol.kind)
        lesions = np.where(existing, np.uint8(L.HIGH_OPACITY), np.uint8(0)).astype(np.uint8)
        meta: dict[str, Any] = {"volume": vol.name, "seed": seed}
        if seed is not None:
            hu, inserted, info = insert_synthetic_lesions(hu, affine, lung & ~existing, seed, vol.name)
            lesions = np.maximum(lesions, inserted)
            meta.update(info)
        labels = finalize_labels(lesions, lung)
        return RawCase(case_id, hu, labels, affine, source="real-ct", meta=meta)


def insert_synthetic_lesions(hu: np.ndarray, affine: np.ndarray, lung: np.ndarray, seed: int,
                             name: str = "") -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Insert synthetic lesions into a copy of ``hu`` inside ``lung`` with
    :func:`lungburden.phantom.insert_lesions`; returns ``(hu, lesion label map, info)``.

    Burden 2-72 % (skewed low) and lesions drawn from ``seed`` and the volume ``name``; lesion
    kinds as the phantom's plan.
    """
    import zlib

    from lungburden.phantom import insert_lesions

    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 0x2C])
    burden = float(2.0 + 70.0 * rng.random() ** 1.5)
    res = insert_lesions(hu, affine, seed=rng, burden_percent=burden, lung_mask=lung)
    lesions = np.where(np.isin(res.labels, (L.GGO, L.HIGH_OPACITY)), res.labels, 0).astype(np.uint8)
    return np.asarray(res.hu, np.float32), lesions, {"target_burden_percent": round(burden, 2)}


# --------------------------------------------------------------------------------------------------
# Data specification (what ``lungburden model train`` / ``evaluate`` read)


@dataclass
class DataSpec:
    """The data options of a run; stored in checkpoints so evaluation can rebuild the same cases."""

    phantoms: int = 0
    phantom_seed_start: int = 1000
    phantom_matrix: int = 256
    phantom_max_slices: int = 96
    real_ct: str | None = None
    real_ct_variants: int = 0
    real_ct_seed_start: int = 1000
    real_ct_include_study: bool = False
    real_ct_clean: bool = False
    nifti: list[str] = field(default_factory=list)
    nifti_layout: str = "generic"
    label_map: str | None = None
    dicom_seg: list[str] = field(default_factory=list)
    seg_map: str | None = None

    def build_sources(self) -> list[CaseSource]:
        sources: list[CaseSource] = []
        if self.phantoms > 0:
            seeds = range(self.phantom_seed_start, self.phantom_seed_start + self.phantoms)
            sources.append(PhantomSource(seeds, self.phantom_matrix, self.phantom_max_slices))
        if self.real_ct and (self.real_ct_variants > 0 or self.real_ct_clean):
            sources.append(RealCTSource(Path(self.real_ct), self.real_ct_variants, self.real_ct_seed_start,
                                        self.real_ct_include_study, self.real_ct_clean))
        for root in self.nifti:
            sources.append(NiftiPairSource(Path(root), self.nifti_layout, self.label_map))
        for root in self.dicom_seg:
            sources.append(DicomSegSource(Path(root), self.seg_map))
        return sources

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class CaseIndex:
    """All cases of some sources, addressable by id (ids are unique across sources)."""

    def __init__(self, sources: Sequence[CaseSource]):
        self.sources = list(sources)
        self._owner: dict[str, CaseSource] = {}
        for s in self.sources:
            for cid in s.case_ids():
                if cid in self._owner:
                    raise ValueError(f"case id {cid} appears in two sources")
                self._owner[cid] = s

    def ids(self) -> list[str]:
        return list(self._owner)

    def source_of(self, case_id: str) -> CaseSource:
        return self._owner[case_id]

    def load(self, case_id: str) -> RawCase:
        return self._owner[case_id].load(case_id)

    def iter_raw(self, case_ids: Sequence[str]) -> Iterator[RawCase]:
        for cid in case_ids:
            yield self.load(cid)


# --------------------------------------------------------------------------------------------------
# Preprocessing and cache


def preprocess_case(raw: RawCase, size: int) -> TrainingCase:
    """The product's preprocessing (section 2.4) of a raw case, labels mapped to the model grid."""
    from lungburden.segmentation.preprocess import labels_to_model_grid, preprocess

    pp = preprocess(raw.hu, size=size)
    labels = labels_to_model_grid(raw.labels, pp.box, size, L.NUM_CLASSES)
    counts = np.bincount(raw.labels.ravel(), minlength=L.NUM_CLASSES)
    lung = int(counts[1:].sum())
    meta = {
        "case_id": raw.case_id,
        "source": raw.source,
        "spacing": list(raw.spacing),
        "shape": list(raw.hu.shape),
        "box": [pp.box.row0, pp.box.col0, pp.box.side],
        "burden_percent": round(100.0 * (counts[L.GGO] + counts[L.HIGH_OPACITY]) / lung, 3) if lung else 0.0,
        **{f"meta_{k}": v for k, v in raw.meta.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    return TrainingCase(raw.case_id, pp.image.numpy().astype(np.float16), labels.numpy().astype(np.uint8), meta)


class CaseCache:
    """Preprocessed cases as ``<cache>/<case id>-<key hash>.npz`` (image, labels, meta json)."""

    def __init__(self, directory: Path | None, size: int):
        self.directory = Path(directory) if directory else None
        self.size = size

    def _path(self, source: CaseSource, case_id: str) -> Path | None:
        if self.directory is None:
            return None
        key = json.dumps([DATA_VERSION, self.size, source.cache_key(case_id),
                          _module_digest("lungburden.segmentation.preprocess")])
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", case_id)[-80:]
        return self.directory / f"{safe}-{digest}.npz"

    def get(self, index: CaseIndex, case_id: str) -> TrainingCase:
        source = index.source_of(case_id)
        path = self._path(source, case_id)
        if path is not None and path.is_file():
            try:
                with np.load(path) as z:
                    return TrainingCase(case_id, z["image"], z["labels"], json.loads(str(z["meta"])))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("cache file %s unreadable (%s); regenerating", path, exc)
        case = preprocess_case(source.load(case_id), self.size)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, image=case.image, labels=case.labels, meta=json.dumps(case.meta))
            os.replace(tmp, path)
        return case


_WORKER_STATE: dict[str, Any] = {}


def _worker_init(index: CaseIndex, cache: CaseCache) -> None:
    """Spawned case-preparation process: one torch thread, the index and cache sent once."""
    import torch

    torch.set_num_threads(1)
    _WORKER_STATE.update(index=index, cache=cache)


def _worker_case(case_id: str) -> TrainingCase:
    return _WORKER_STATE["cache"].get(_WORKER_STATE["index"], case_id)


def load_training_cases(index: CaseIndex, case_ids: Sequence[str], cache: CaseCache,
                        progress: bool = True, workers: int = 0) -> list[TrainingCase]:
    """The preprocessed cases of ``case_ids`` (from the cache, else generated and cached), in order.

    ``workers > 1`` generates them in that many processes (spawned: safe beside torch threads).
    """
    from tqdm import tqdm

    bar = {"desc": "cases", "unit": "case", "disable": not progress, "leave": False, "total": len(case_ids)}
    if workers > 1 and len(case_ids) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(min(workers, len(case_ids)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(index, cache))
        try:
            return list(tqdm(pool.map(_worker_case, case_ids), **bar))
        finally:
            pool.shutdown(cancel_futures=True)
    return [cache.get(index, cid) for cid in tqdm(case_ids, **bar)]


# --------------------------------------------------------------------------------------------------
# Windows


class WindowSampler:
    """Draws ``(case index, target slice)`` pairs for one epoch.

    A case is drawn uniformly (so thin-slice cases do not dominate), then a slice with weight 1
    without lung, 4 with lung and 12 with lesion (lesion slices are a minority, section 3 / Table 2).

    ``high_opacity_boost`` K > 0 draws case c with weight 1 + K·h_c instead, h_c being the share
    of its lung (lung + lesion voxels) that is high opacity: consolidated "white lungs" and
    effusions, the rarest and most often missed pattern, are seen more often.
    """

    def __init__(self, cases: Sequence[TrainingCase], weights: tuple[float, float, float] = (1.0, 4.0, 12.0),
                 high_opacity_boost: float = 0.0):
        if high_opacity_boost < 0:
            raise ValueError(f"high-opacity boost must be >= 0, got {high_opacity_boost}")
        self.cases = cases
        self.probs = []
        case_weights = []
        for c in cases:
            lab = c.labels.reshape(c.num_slices, -1)
            has_lung = (lab > 0).any(1)
            has_lesion = (lab >= L.GGO).any(1)
            w = np.where(has_lesion, weights[2], np.where(has_lung, weights[1], weights[0]))
            self.probs.append(w / w.sum())
            lung = int(np.count_nonzero(lab))
            high = int(np.count_nonzero(lab == L.HIGH_OPACITY))
            case_weights.append(1.0 + high_opacity_boost * (high / lung if lung else 0.0))
        # None: uniform, drawn as before the boost existed (same random stream, same runs).
        self.case_probs = np.asarray(case_weights) / sum(case_weights) if high_opacity_boost else None

    def sample(self, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        if self.case_probs is None:
            picks = rng.integers(0, len(self.cases), size=n)
        else:
            picks = rng.choice(len(self.cases), size=n, p=self.case_probs)
        return [(int(i), int(rng.choice(len(self.probs[i]), p=self.probs[i]))) for i in picks]

    def evenly(self, per_case: int) -> list[tuple[int, int]]:
        """Deterministic targets for validation: ``per_case`` slices evenly over each case's lung slices."""
        out = []
        for i, c in enumerate(self.cases):
            lab = c.labels.reshape(c.num_slices, -1)
            slices = np.flatnonzero((lab > 0).any(1))
            if not slices.size:
                slices = np.arange(c.num_slices)
            take = np.unique(np.linspace(0, slices.size - 1, min(per_case, slices.size)).round().astype(int))
            out += [(i, int(slices[k])) for k in take]
        return out


def make_batch(cases: Sequence[TrainingCase], picks: Sequence[tuple[int, int]], context: int):
    """Windows ``(B, 2·context+1, S, S)`` float32 and centre labels ``(B, S, S)`` int64 (torch)."""
    import torch

    from lungburden.segmentation.preprocess import window_indices

    xs, ys = [], []
    for ci, t in picks:
        c = cases[ci]
        xs.append(c.image[window_indices(c.num_slices, t, context)])
        ys.append(c.labels[t])
    x = torch.from_numpy(np.stack(xs).astype(np.float32))
    y = torch.from_numpy(np.stack(ys).astype(np.int64))
    return x, y


class WindowDataset:
    """Map-style dataset (usable with ``torch.utils.data.DataLoader``) of ``(case, slice)``
    targets: item = (window ``(2·context+1, S, S)`` float32, centre label map ``(S, S)`` int64)."""

    def __init__(self, cases: Sequence[TrainingCase], picks: Sequence[tuple[int, int]], context: int):
        self.cases, self.picks, self.context = cases, list(picks), context

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, i: int):
        x, y = make_batch(self.cases, [self.picks[i]], self.context)
        return x[0], y[0]


def slab_starts(cases: Sequence[TrainingCase], picks: Sequence[tuple[int, int]], length: int
                ) -> list[tuple[int, int, int]]:
    """Turn sampled centre slices into slabs ``(case, first target, targets)`` of ``length`` targets."""
    out = []
    for ci, t in picks:
        n = min(length, cases[ci].num_slices)
        t0 = int(np.clip(t - n // 2, 0, cases[ci].num_slices - n))
        out.append((ci, t0, n))
    return out


def make_slab(case: TrainingCase, t0: int, n: int, context: int):
    """A contiguous slab for ``forward_sequence``: input ``(n + 2·context, S, S)`` (edges replicated)
    and the labels of its ``n`` targets ``(n, S, S)`` (torch float32 / int64)."""
    import torch

    idx = np.clip(np.arange(t0 - context, t0 + n + context), 0, case.num_slices - 1)
    x = torch.from_numpy(case.image[idx].astype(np.float32))
    y = torch.from_numpy(case.labels[t0:t0 + n].astype(np.int64))
    return x, y


# --------------------------------------------------------------------------------------------------
# Augmentation (section 2.4)


@dataclass(frozen=True)
class Augmentation:
    """Random affine of section 2.4. Translation is ``max_shift`` of the width (10 px of 256)."""

    max_rotation_deg: float = 10.0
    max_shift: float = 10.0 / 256.0
    scale_range: tuple[float, float] = (0.9, 1.05)


def affine_thetas(batch: int, aug: Augmentation, generator) -> Any:
    """``(B, 2, 3)`` sampling matrices for ``affine_grid`` (output → input normalised coordinates).

    A scale ``s`` > 1 zooms in (the sampled area shrinks by 1/s); a shift ``t`` (fraction of the
    width) moves the content by ``t``.
    """
    import torch

    u = torch.rand(batch, 4, generator=generator, dtype=torch.float64)
    angle = torch.deg2rad((u[:, 0] * 2 - 1) * aug.max_rotation_deg)
    lo, hi = aug.scale_range
    scale = lo + u[:, 1] * (hi - lo)
    tx = (u[:, 2] * 2 - 1) * aug.max_shift * 2.0  # normalised coords span 2 per width
    ty = (u[:, 3] * 2 - 1) * aug.max_shift * 2.0
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, -tx], 1), torch.stack([sin, cos, -ty], 1)], 1)
    return theta.float()


def warp(x, y, theta):
    """Apply ``theta`` to windows ``x`` (B, K, S, S) bilinearly and labels ``y`` (B, S, S) or
    (B, T, S, S) by nearest neighbour; outside the image is 0 (air after min-max) and background."""
    import torch
    import torch.nn.functional as F

    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    xw = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y4 = y[:, None] if y.dim() == 3 else y
    yw = F.grid_sample(y4.to(torch.float32), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    yw = yw.round().to(y.dtype)
    return xw, (yw[:, 0] if y.dim() == 3 else yw)


def augment_batch(x, y, generator, aug: Augmentation = Augmentation()):
    """Section 2.4 augmentation: one random affine per window, identical for all its slices and the label."""
    return warp(x, y, affine_thetas(x.shape[0], aug, generator))


# --------------------------------------------------------------------------------------------------
# Synthetic volume for compute measurements


def synthetic_volume(slices: int, rows: int = 512, seed: int = 7):
    """A phantom :class:`CTVolume` of ``slices`` 5 mm slices at ``rows`` × ``rows`` (Table 4 timings)."""
    from lungburden.phantom import PhantomSpec, generate_phantom

    names = {f.name for f in dataclasses.fields(PhantomSpec)}
    wanted = dict(seed=seed, slices=slices, slice_spacing_mm=5.0 if slices <= 80 else 2.5, rows=rows, cols=rows,
                  burden_percent=20.0)
    spec = PhantomSpec(**{k: v for k, v in wanted.items() if k in names})
    ph = generate_phantom(spec)
    case = RawCase("synthetic", np.asarray(ph.hu, np.float32), np.asarray(ph.labels), np.asarray(ph.affine),
                   "phantom")
    return case.to_volume()


def split_folds(case_ids: Sequence[str], folds: int, seed: int = 0) -> list[list[str]]:
    """Split ids into ``folds`` disjoint, near-equal subsets (seeded shuffle; section 2.7, Fig. 3).

    Variants of the same real volume (``real-<name>-s<seed>``) stay in one fold, so a fold's
    test set never shares anatomy with its training set.
    """
    groups: dict[str, list[str]] = {}
    for cid in case_ids:
        m = re.match(r"^(real-.+)-(s\d+|clean)$", cid)
        groups.setdefault(m.group(1) if m else cid, []).append(cid)
    keys = sorted(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(keys)
    keys.sort(key=lambda k: -len(groups[k]))  # big groups first, then greedy balancing
    out: list[list[str]] = [[] for _ in range(folds)]
    for k in keys:
        smallest = min(range(folds), key=lambda i: (len(out[i]), i))
        out[smallest].extend(groups[k])
    return [sorted(f) for f in out]

