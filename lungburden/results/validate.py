"""Independent checks of the SEG/SR outputs with the field's tools (used by tests and ``--validate``).

* ``dciodvfy`` (dicom3tools): the IOD validator, errors and warnings parsed from its output.
* dcmqi ``segimage2itkimage``: reads the SEG back into one image per segment (NIfTI, read with
  nibabel) which is re-ordered onto the CTVolume grid and axis order ``(slice, row, column)``.
* dcmqi ``tid1500reader``: reads the TID 1500 SR back into JSON; the numbers are mapped onto the
  field names of :class:`lungburden.quantify.Quantities`.

Binaries are looked up next to the running interpreter first (the dcmqi wheel installs them into
the virtual environment's ``bin``), then on ``PATH``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungburden.results.sr_followup import CHANGE_TRACKING_ID, PRIOR_TRACKING_PREFIX
from lungburden.results.sr_zones import ZONES_TRACKING_ID

#: Finding codes (CodeValue) of the SR groups -> the Quantities field prefix they carry.
_FINDING_GROUPS = {
    "39607008": "lung",  # Lung (lung field group)
    "112120": "ggo",  # Ground glass opacity
    "95436008": "high_opacity",  # Lung consolidation (high opacity)
    "112033": "opacity",  # Abnormal opacity (burden group)
}


class ToolNotFound(FileNotFoundError):
    """A validation tool (dciodvfy, dcmqi) is not installed."""


def find_tool(name: str) -> Path:
    """Path of executable ``name``: next to ``sys.executable``, else on ``PATH``."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return local
    found = shutil.which(name)
    if found is None:
        raise ToolNotFound(f"{name} not found next to {sys.executable} nor on PATH")
    return Path(found)


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class ValidationReport:
    """Messages of ``dciodvfy`` for one file."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors


def parse_dciodvfy(output: str) -> ValidationReport:
    """Split dciodvfy output into error and warning messages (``Error - ...`` / ``E: ...``)."""
    report = ValidationReport(output=output)
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith(("Error", "E:")):
            report.errors.append(line)
        elif line.startswith(("Warning", "W:")):
            report.warnings.append(line)
    return report


def run_dciodvfy(path: str | Path, *, timeout: float = 120.0) -> ValidationReport:
    """Validate one DICOM file against its IOD with dicom3tools' ``dciodvfy``."""
    proc = _run([str(find_tool("dciodvfy")), str(path)], timeout)
    return parse_dciodvfy(proc.stdout + proc.stderr)


def _reorder(array_ijk: np.ndarray, affine_lps: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """Re-index ``array_ijk`` (indices -> LPS by ``affine_lps``) onto the grid of ``target_affine``.

    The two grids must be the same up to axis permutation and flips (no resampling).
    """
    mapping = np.linalg.inv(target_affine) @ affine_lps  # source index -> target index
    rot = mapping[:3, :3]
    perm = np.argmax(np.abs(rot), axis=1)  # for each target axis, the source axis
    if sorted(perm.tolist()) != [0, 1, 2] or not np.allclose(np.abs(rot[np.arange(3), perm]), 1.0, atol=1e-3):
        raise ValueError("the SEG grid is not a permutation of the target grid (needs resampling)")
    out = np.transpose(array_ijk, perm)
    for axis in range(3):
        sign = rot[axis, perm[axis]]
        offset = mapping[axis, 3]
        if sign < 0:
            out = np.flip(out, axis=axis)
            offset = offset - (out.shape[axis] - 1)
        if abs(offset) > 1e-2:
            raise ValueError(f"the SEG grid is shifted by {offset:.3f} voxels along target axis {axis}")
    return np.ascontiguousarray(out)


def _default_target(affine_lps: np.ndarray, shape_ijk: tuple[int, ...]) -> np.ndarray:
    """CTVolume convention: axes (slice, row, column), slice axis along row x column directions."""
    col_step, row_step, slice_step = (affine_lps[:3, i] for i in range(3))
    flip = float(np.dot(slice_step, np.cross(row_step, col_step))) < 0
    target = np.eye(4)
    target[:3, 0] = -slice_step if flip else slice_step
    target[:3, 1] = row_step
    target[:3, 2] = col_step
    origin = affine_lps[:3, 3] + (slice_step * (shape_ijk[2] - 1) if flip else 0.0)
    target[:3, 3] = origin
    return target


def read_seg_with_dcmqi(
    path: str | Path,
    workdir: str | Path,
    *,
    reference_affine: np.ndarray | None = None,
    timeout: float = 300.0,
) -> dict[int, np.ndarray]:
    """Masks of every segment of a SEG as decoded by dcmqi, keyed by segment number.

    Each mask is a boolean array in CTVolume axis order ``(slice, row, column)``; on the grid of
    ``reference_affine`` (a :attr:`CTVolume.affine`) if given, else with highdicom's slice order.
    """
    import nibabel as nib

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    proc = _run(
        [
            str(find_tool("segimage2itkimage")),
            "--inputDICOM",
            str(path),
            "--outputDirectory",
            str(workdir),
            "-t",
            "nifti",
        ],
        timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"segimage2itkimage failed ({proc.returncode}): {proc.stderr[-2000:]}")
    meta = json.loads((workdir / "meta.json").read_text())
    masks: dict[int, np.ndarray] = {}
    for index, attributes in enumerate(meta["segmentAttributes"], start=1):
        image = nib.load(workdir / f"{index}.nii.gz")
        data = np.asarray(image.dataobj)
        affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine  # NIfTI RAS -> DICOM LPS
        target = reference_affine if reference_affine is not None else _default_target(affine_lps, data.shape)
        values = [int(v) for v in np.unique(data) if v != 0]
        numbers = values or [int(item["labelID"]) for item in attributes]
        for number in numbers:
            masks[number] = _reorder(data == number, affine_lps, np.asarray(target, dtype=float))
    return masks


def run_tid1500reader(path: str | Path, workdir: str | Path, *, timeout: float = 120.0) -> dict:
    """The JSON that dcmqi ``tid1500reader`` writes for a TID 1500 SR."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "sr_metadata.json"
    proc = _run(
        [str(find_tool("tid1500reader")), "--inputDICOM", str(path), "--outputMetadata", str(out)],
        timeout,
    )
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"tid1500reader failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def read_sr_with_dcmqi(path: str | Path, workdir: str | Path) -> dict[str, float]:
    """The measurements of a lungburden SR as read by dcmqi, keyed by ``Quantities`` field name.

    dcmqi reports finding sites per group only, so the left/right lung volumes are told apart by
    their order in the lung field group (total, left, right; see :mod:`lungburden.results.sr`).
    """
    metadata = run_tid1500reader(path, workdir)
    values: dict[str, float] = {}
    for group in metadata.get("Measurements", []):
        tracking = str(group.get("TrackingIdentifier", ""))
        if tracking == ZONES_TRACKING_ID:
            values.update(_zone_values(group))
            continue
        if tracking == CHANGE_TRACKING_ID or tracking.startswith(PRIOR_TRACKING_PREFIX):
            continue  # numbers of prior studies (lungburden.results.sr_followup)
        prefix = _FINDING_GROUPS.get(group.get("Finding", {}).get("CodeValue", ""))
        if prefix is None:
            continue
        volumes: list[float] = []
        for item in group.get("measurementItems", []):
            quantity = item["quantity"]["CodeValue"]
            value = float(item["value"])
            if quantity == "118565006":  # Volume
                volumes.append(value)
            elif quantity == "113288":  # Volume Ratio (%)
                values["burden_percent" if prefix == "opacity" else f"{prefix}_percent"] = value
            elif quantity == "112031" and item.get("derivationModifier", {}).get("CodeValue") == "373098007":
                values[f"{prefix}_mean_hu"] = value
        if volumes:
            values[f"{prefix}_volume_ml"] = volumes[0]
        if prefix == "lung" and len(volumes) == 3:
            values["left_lung_volume_ml"], values["right_lung_volume_ml"] = volumes[1], volumes[2]
    return values


#: Zone keys of :func:`read_sr_with_dcmqi`, in the order of the SR group (right lung first).
ZONE_KEYS: tuple[str, ...] = tuple(f"zone_{lung}_{zone}" for lung in ("right", "left")
                                   for zone in ("upper", "middle", "lower"))


def _zone_values(group: dict) -> dict[str, float]:
    """``zone_<lung>_<zone>_percent`` / ``_score`` and ``zones_total_score`` of the "Lung zones"
    group, by the order of its measurements (dcmqi does not report per-measurement sites)."""
    ratios = [float(i["value"]) for i in group.get("measurementItems", []) if i["quantity"]["CodeValue"] == "113288"]
    scores = [float(i["value"]) for i in group.get("measurementItems", []) if i["quantity"]["CodeValue"] == "246262008"]
    out = {f"{key}_percent": value for key, value in zip(ZONE_KEYS, ratios, strict=False)}
    out.update({f"{key}_score": value for key, value in zip(ZONE_KEYS, scores, strict=False)})
    if len(scores) == len(ZONE_KEYS) + 1:
        out["zones_total_score"] = scores[-1]
    return out


def zone_values(zones) -> dict[str, float]:
    """The keys of :func:`_zone_values` from a :class:`~lungburden.quantify.ZoneInvolvement`."""
    out: dict[str, float] = {"zones_total_score": float(zones.total_score)}
    for zone in zones.zones:
        out[f"zone_{zone.lung}_{zone.zone}_percent"] = zone.involvement_percent
        out[f"zone_{zone.lung}_{zone.zone}_score"] = float(zone.score)
    return out


def result_values(result: dict) -> dict:
    """``result`` (the content of result.json) with the lung-zone figures added under the keys
    of :func:`read_sr_with_dcmqi` (``zone_<lung>_<zone>_percent`` / ``_score``,
    ``zones_total_score``), so that the numbers read from the SR compare key by key."""
    values = dict(result)
    zones = result.get("zones")
    if zones:
        values["zones_total_score"] = zones["total_score"]
        for zone in zones["zones"]:
            values[f"zone_{zone['lung']}_{zone['zone']}_percent"] = zone["involvement_percent"]
            values[f"zone_{zone['lung']}_{zone['zone']}_score"] = zone["score"]
    return values
