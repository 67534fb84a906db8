"""The one pipeline behind every front door (CLI, DICOM node, Orthanc plugin).

files of one series -> :class:`CTVolume` -> segmenter -> label map -> :class:`Quantities`
-> SEG + SR + result.json. Each step is a function with typed inputs and outputs so that it
can be tested alone; :func:`process_series` chains them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lungburden import __version__
from lungburden.dicom_io.content import check_lungs, describe_input
from lungburden.dicom_io.volume import CTVolume, LoadLimits, load_files
from lungburden.quantify import Quantities, quantify
from lungburden.segmentation.base import AlgorithmInfo, Segmenter
from lungburden.segmentation.registry import get_segmenter

log = logging.getLogger(__name__)

#: Called with a short step name ("load", "segment", ...) when a step starts.
ProgressCallback = Callable[[str], None]


@dataclass(frozen=True, eq=False)
class AnalysisResult:
    """A segmented and quantified series."""

    volume: CTVolume
    labels: np.ndarray
    quantities: Quantities
    algorithm: AlgorithmInfo
    model: str
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class AnalysisOutputs:
    """The encoded results of one series and where they were written."""

    seg: Dataset
    sr: Dataset
    result: dict
    seg_path: Path
    sr_path: Path
    result_path: Path


def analyze_volume(volume: CTVolume, segmenter: Segmenter, model: str) -> AnalysisResult:
    """Segment and quantify a loaded volume."""
    start = time.perf_counter()
    labels = segmenter.segment(volume)
    if labels.shape != volume.hu.shape or labels.dtype != np.uint8:
        raise RuntimeError(f"segmenter {model!r} returned {labels.dtype} {labels.shape}, expected uint8 {volume.shape}")
    segmented = time.perf_counter()
    quantities = quantify(labels, volume.hu, volume.affine)
    timings = {"segment": segmented - start, "quantify": time.perf_counter() - segmented}
    return AnalysisResult(volume, labels, quantities, segmenter.info, model, timings)


def result_uids(uid_seed: str) -> dict[str, str]:
    """Deterministic Series/SOP Instance UIDs of the SEG and SR for one ``uid_seed`` (PS3.5 9.1).

    The node seeds them with (source series, its instance set, model, version), so re-processing
    the same series version yields the same UIDs and a PACS stores it once (idempotency).
    """
    return {
        name: generate_uid(entropy_srcs=["lungburden", uid_seed, name])
        for name in ("seg_series", "seg_sop", "sr_series", "sr_sop")
    }


def encode_results(result: AnalysisResult, uid_seed: str | None = None) -> tuple[Dataset, Dataset]:
    """The DICOM SEG and the TID 1500 Comprehensive 3D SR of an analysis (new series, same study).

    With ``uid_seed`` the result UIDs are deterministic (:func:`result_uids`); else random.
    """
    from lungburden.results.seg import build_segmentation
    from lungburden.results.sr import build_measurement_report

    uids = result_uids(uid_seed) if uid_seed else {}
    seg = build_segmentation(
        result.volume, result.labels, result.algorithm,
        series_instance_uid=uids.get("seg_series"), sop_instance_uid=uids.get("seg_sop"),
    )
    sr = build_measurement_report(
        result.volume, seg, result.quantities, result.algorithm,
        series_instance_uid=uids.get("sr_series"), sop_instance_uid=uids.get("sr_sop"),
    )
    return seg, sr


def result_document(result: AnalysisResult, seg: Dataset, sr: Dataset, input_info: dict | None = None) -> dict:
    """The content of ``result.json`` (UIDs, model, quantities, geometry; no patient data).

    ``input``: what was analysed and notes on it (:func:`~lungburden.dicom_io.content.describe_input`).
    """
    volume = result.volume
    return {
        "study_instance_uid": volume.study_instance_uid,
        "series_instance_uid": volume.series_instance_uid,
        "model": result.model,
        "model_version": result.algorithm.version,
        "weights": result.algorithm.weights_file,
        "weights_sha256": result.algorithm.weights_sha256,
        **result.quantities.to_dict(),
        "seg_sop_instance_uid": str(seg.SOPInstanceUID),
        "seg_series_instance_uid": str(seg.SeriesInstanceUID),
        "sr_sop_instance_uid": str(sr.SOPInstanceUID),
        "sr_series_instance_uid": str(sr.SeriesInstanceUID),
        "slices": volume.shape[0],
        "matrix": list(volume.shape[1:]),
        "voxel_spacing_mm": [round(s, 4) for s in volume.spacing],
        "input": input_info if input_info is not None else describe_input(volume),
        "software_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
    }


def write_outputs(seg: Dataset, sr: Dataset, document: dict, out_dir: Path) -> tuple[Path, Path, Path]:
    """Write ``seg.dcm``, ``sr.dcm`` and ``result.json``; each file appears atomically (rename)."""
    from lungburden.results.seg import write_dataset

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "seg.dcm", out_dir / "sr.dcm", out_dir / "result.json"
    write_dataset(seg, paths[0])
    write_dataset(sr, paths[1])
    tmp = paths[2].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(paths[2])
    return paths


def process_series(
    files: Sequence[Path],
    out_dir: Path,
    model: str | None = None,
    limits: LoadLimits = LoadLimits(),
    progress: ProgressCallback | None = None,
    segmenter: Segmenter | None = None,
    uid_seed: str | None = None,
    weights: str | Path | None = None,
) -> AnalysisOutputs:
    """Load the files of one series, analyse, encode and write the results to ``out_dir``.

    ``uid_seed`` makes the result UIDs deterministic (see :func:`result_uids`). ``weights``: a
    network weights file for ``model`` (default the shipped one), unless ``segmenter`` is given.

    Raises :class:`~lungburden.dicom_io.volume.SeriesRejected` for input that cannot be
    analysed, including a series without the lungs (:func:`~lungburden.dicom_io.content.check_lungs`);
    nothing is written in that case.
    """
    notify = progress or (lambda step: None)
    timings: dict[str, float] = {}
    notify("load")
    start = time.perf_counter()
    volume = load_files(list(files), limits)
    content = check_lungs(volume, limits.body_part_regex)
    timings["load"] = time.perf_counter() - start
    if segmenter is None:
        segmenter = get_segmenter(model, weights=weights)
    model_name = model or getattr(segmenter, "name", None) or segmenter.info.name
    notify("segment")
    result = analyze_volume(volume, segmenter, model_name)
    notify("encode")
    start = time.perf_counter()
    seg, sr = encode_results(result, uid_seed)
    result.timings_s.update(timings, encode=time.perf_counter() - start)
    document = result_document(result, seg, sr, describe_input(volume, content, limits.body_part_regex))
    seg_path, sr_path, result_path = write_outputs(seg, sr, document, Path(out_dir))
    log.info(
        "series %s analysed with %s: burden %.2f %% -> SEG %s, SR %s",
        volume.series_instance_uid, model_name, result.quantities.burden_percent,
        seg.SOPInstanceUID, sr.SOPInstanceUID,
    )
    return AnalysisOutputs(seg, sr, document, seg_path, sr_path, result_path)
