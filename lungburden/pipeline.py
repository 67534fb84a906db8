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
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lungburden import __version__
from lungburden.dicom_io.content import check_lungs, describe_input
from lungburden.dicom_io.volume import CTVolume, LoadLimits, load_files
from lungburden.followup.trend import FollowUp
from lungburden.quality import QualityRefused, QualityReport, add_to_sr, check_input, check_result, enforce
from lungburden.quantify import Quantities, quantify
from lungburden.segmentation.base import AlgorithmInfo, Segmenter
from lungburden.segmentation.registry import get_segmenter

log = logging.getLogger(__name__)

#: Called with a short step name ("load", "segment", ...) when a step starts.
ProgressCallback = Callable[[str], None]
#: Finds the priors of an analysed series (:class:`lungburden.followup.priors.PriorFinder`).
PriorsFn = Callable[[CTVolume, AlgorithmInfo], FollowUp]


@dataclass(frozen=True, eq=False)
class AnalysisResult:
    """A segmented and quantified series."""

    volume: CTVolume
    labels: np.ndarray
    quantities: Quantities
    algorithm: AlgorithmInfo
    model: str
    timings_s: dict[str, float] = field(default_factory=dict)
    #: The patient's priors and the change since the most recent one (:mod:`lungburden.followup`).
    followup: FollowUp | None = None


#: The result objects a run can produce (``processing.outputs``): DICOM SEG, TID 1500 SR,
#: Secondary Capture key images, PDF report (Encapsulated PDF + report.pdf).
OUTPUTS: tuple[str, ...] = ("seg", "sr", "sc", "pdf")
#: Key axial slices of the Secondary Capture series (plus a coronal view and a summary image).
SC_SLICES = 8


@dataclass(frozen=True, eq=False)
class EncodedResults:
    """The result objects of one analysis; ``seg`` and ``sr`` always (the SR references the SEG)."""

    seg: Dataset
    sr: Dataset
    sc: list[Dataset] = field(default_factory=list)
    pdf: Dataset | None = None
    pdf_bytes: bytes | None = None
    outputs: tuple[str, ...] = OUTPUTS

    def __iter__(self):  # ``seg, sr = encode_results(...)``
        return iter((self.seg, self.sr))


@dataclass(frozen=True, eq=False)
class AnalysisOutputs:
    """The encoded results of one series and where they were written (``seg`` and ``seg_path``
    None for a result refused by the quality checks and reported by an SR that says so)."""

    seg: Dataset | None
    sr: Dataset
    result: dict
    seg_path: Path | None
    sr_path: Path
    result_path: Path
    sc_paths: tuple[Path, ...] = ()
    pdf_path: Path | None = None
    report_path: Path | None = None


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
    """Deterministic Series/SOP Instance UIDs of every result object for one ``uid_seed`` (PS3.5 9.1).

    Keys: ``seg_series``, ``seg_sop``, ``sr_series``, ``sr_sop``, ``sc_series``, ``sc_sop_<n>``
    (n = 0 ..), ``pdf_series``, ``pdf_sop``.

    The node seeds them with (source series, its instance set, model, version), so re-processing
    the same series version yields the same UIDs and a PACS stores it once (idempotency).
    """
    return {
        name: generate_uid(entropy_srcs=["lungburden", uid_seed, name])
        for name in (
            "seg_series", "seg_sop", "sr_series", "sr_sop", "sc_series", "pdf_series", "pdf_sop",
            *(f"sc_sop_{n}" for n in range(SC_SLICES + 2)),
        )
    }


def check_outputs(outputs: Sequence[str]) -> tuple[str, ...]:
    """``outputs`` in canonical order; raises ValueError for unknown names or an SR without SEG."""
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ValueError(f"unknown outputs {unknown}; choose from {list(OUTPUTS)}")
    if "sr" in outputs and "seg" not in outputs:
        raise ValueError("the SR references the SEG: output 'sr' needs 'seg'")
    if not outputs:
        raise ValueError("no outputs selected")
    return tuple(name for name in OUTPUTS if name in outputs)


def encode_results(
    result: AnalysisResult, uid_seed: str | None = None, outputs: Sequence[str] = OUTPUTS
) -> EncodedResults:
    """SEG, TID 1500 SR and, as ``outputs`` asks, SC key images and the PDF report (new series each).

    With ``uid_seed`` the result UIDs are deterministic (:func:`result_uids`); else random.
    Unpacks as ``seg, sr``.
    """
    from lungburden.results.seg import build_segmentation
    from lungburden.results.sr import build_measurement_report

    outputs = check_outputs(outputs)

    uids = result_uids(uid_seed) if uid_seed else {}
    seg = build_segmentation(
        result.volume, result.labels, result.algorithm,
        series_instance_uid=uids.get("seg_series"), sop_instance_uid=uids.get("seg_sop"),
    )
    sr = build_measurement_report(
        result.volume, seg, result.quantities, result.algorithm,
        series_instance_uid=uids.get("sr_series"), sop_instance_uid=uids.get("sr_sop"),
        labels=result.labels, followup=result.followup,
    )
    trend = result.followup.trend(result.quantities) if result.followup and result.followup.priors else None
    sc: list[Dataset] = []
    if "sc" in outputs:
        from lungburden.results.sc import build_secondary_captures

        sc = build_secondary_captures(
            result.volume, result.labels, result.quantities, result.algorithm,
            series_instance_uid=uids.get("sc_series"),
            sop_instance_uids=[uids[f"sc_sop_{n}"] for n in range(SC_SLICES + 2)] if uids else None,
            slice_count=SC_SLICES, trend=trend,
        )
    pdf = pdf_bytes = None
    if "pdf" in outputs:
        from lungburden.results.pdf import build_encapsulated_pdf, render_pdf

        created = datetime.now()
        pdf_bytes = render_pdf(result.volume, result.labels, result.quantities, result.algorithm, created=created,
                               trend=trend)
        pdf = build_encapsulated_pdf(
            result.volume, pdf_bytes, result.algorithm, created=created,
            series_instance_uid=uids.get("pdf_series"), sop_instance_uid=uids.get("pdf_sop"),
        )
    return EncodedResults(seg, sr, sc, pdf, pdf_bytes, outputs)


def result_document(result: AnalysisResult, seg: Dataset, sr: Dataset, input_info: dict | None = None,
                    quality: QualityReport | None = None, encoded: EncodedResults | None = None) -> dict:
    """The content of ``result.json`` (UIDs, model, quantities, geometry; no patient data).

    ``input``: what was analysed and notes on it (:func:`~lungburden.dicom_io.content.describe_input`);
    ``quality``: the flags of the quality checks (:mod:`lungburden.quality`); ``encoded``: the
    outputs produced (``outputs`` and the UIDs of the SC series and PDF report).
    """
    volume = result.volume
    extras: dict = {"outputs": list(encoded.outputs) if encoded is not None else ["seg", "sr"]}
    if encoded is not None and encoded.sc:
        extras["sc_series_instance_uid"] = str(encoded.sc[0].SeriesInstanceUID)
        extras["sc_sop_instance_uids"] = [str(ds.SOPInstanceUID) for ds in encoded.sc]
    if encoded is not None and encoded.pdf is not None:
        extras["pdf_series_instance_uid"] = str(encoded.pdf.SeriesInstanceUID)
        extras["pdf_sop_instance_uid"] = str(encoded.pdf.SOPInstanceUID)
    return {
        "study_instance_uid": volume.study_instance_uid,
        "series_instance_uid": volume.series_instance_uid,
        "model": result.model,
        "model_version": result.algorithm.version,
        "weights": result.algorithm.weights_file,
        "weights_sha256": result.algorithm.weights_sha256,
        **result.quantities.to_dict(),
        **(result.followup.to_dict(result.quantities) if result.followup is not None else {}),
        "seg_sop_instance_uid": str(seg.SOPInstanceUID),
        "seg_series_instance_uid": str(seg.SeriesInstanceUID),
        "sr_sop_instance_uid": str(sr.SOPInstanceUID),
        "sr_series_instance_uid": str(sr.SeriesInstanceUID),
        **extras,
        "slices": volume.shape[0],
        "matrix": list(volume.shape[1:]),
        "voxel_spacing_mm": [round(s, 4) for s in volume.spacing],
        "input": input_info if input_info is not None else describe_input(volume),
        **({"quality": quality.to_dict()} if quality is not None else {}),
        "software_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
    }


#: Where :func:`write_outputs` puts the SC images, the Encapsulated PDF and the PDF.
SC_DIR, PDF_DICOM, PDF_FILE = "sc", "report.dcm", "report.pdf"


def write_result_document(document: dict, path: Path) -> None:
    """``result.json``, appearing atomically (written beside, then renamed)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)


def write_outputs(
    seg: Dataset, sr: Dataset, document: dict, out_dir: Path, encoded: EncodedResults | None = None
) -> tuple[Path, Path, Path]:
    """Write the selected outputs and ``result.json``; each file appears atomically (rename).

    ``seg.dcm``, ``sr.dcm``; with ``encoded``: ``sc/sc_NN.dcm``, ``report.dcm`` (Encapsulated PDF)
    and ``report.pdf``. Returns the paths of SEG, SR and result.json.
    """
    from lungburden.results.seg import write_dataset

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "seg.dcm", out_dir / "sr.dcm", out_dir / "result.json"
    outputs = encoded.outputs if encoded is not None else ("seg", "sr")
    for name, ds, path in (("seg", seg, paths[0]), ("sr", sr, paths[1])):
        if name in outputs:
            write_dataset(ds, path)
        else:
            path.unlink(missing_ok=True)
    sc_dir = out_dir / SC_DIR
    for old in sc_dir.glob("*.dcm") if sc_dir.is_dir() else ():
        old.unlink()
    if encoded is not None and encoded.sc:
        sc_dir.mkdir(exist_ok=True)
        for n, ds in enumerate(encoded.sc, start=1):
            write_dataset(ds, sc_dir / f"sc_{n:02d}.dcm")
    for name in (PDF_DICOM, PDF_FILE):
        (out_dir / name).unlink(missing_ok=True)
    if encoded is not None and encoded.pdf is not None and encoded.pdf_bytes is not None:
        write_dataset(encoded.pdf, out_dir / PDF_DICOM)
        tmp_pdf = out_dir / (PDF_FILE + ".tmp")
        tmp_pdf.write_bytes(encoded.pdf_bytes)
        tmp_pdf.replace(out_dir / PDF_FILE)
    write_result_document(document, paths[2])
    return paths


def write_refusal(volume: CTVolume, refusal: QualityRefused, algorithm: AlgorithmInfo, model: str,
                  out_dir: Path, uid_seed: str | None = None) -> AnalysisOutputs:
    """Write ``sr.dcm`` (a TID 1500 report without measurements whose Qualitative Evaluations give
    the reasons, :func:`~lungburden.results.sr.build_refusal_report`) and ``result.json``
    (``refused``: the reason; ``outputs``: ``["sr"]``) for a result the quality checks refused."""
    from lungburden.results.seg import write_dataset
    from lungburden.results.sr import build_refusal_report

    uids = result_uids(uid_seed) if uid_seed else {}
    sr = build_refusal_report(volume, algorithm, series_instance_uid=uids.get("sr_series"),
                              sop_instance_uid=uids.get("sr_sop"))
    add_to_sr(sr, refusal.report)
    reason = f"no measurements: quality check: {'; '.join(refusal.report.reasons)}"
    document = {
        "study_instance_uid": volume.study_instance_uid,
        "series_instance_uid": volume.series_instance_uid,
        "model": model,
        "model_version": algorithm.version,
        "refused": reason,
        "outputs": ["sr"],
        "sr_sop_instance_uid": str(sr.SOPInstanceUID),
        "sr_series_instance_uid": str(sr.SeriesInstanceUID),
        "slices": volume.shape[0],
        "quality": refusal.report.to_dict(),
        "software_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    sr_path, result_path = out_dir / "sr.dcm", out_dir / "result.json"
    write_dataset(sr, sr_path)
    write_result_document(document, result_path)
    log.warning("series %s: %s -> SR %s", volume.series_instance_uid, reason, sr.SOPInstanceUID)
    return AnalysisOutputs(None, sr, document, None, sr_path, result_path)


def process_series(
    files: Sequence[Path],
    out_dir: Path,
    model: str | None = None,
    limits: LoadLimits = LoadLimits(),
    progress: ProgressCallback | None = None,
    segmenter: Segmenter | None = None,
    uid_seed: str | None = None,
    weights: str | Path | None = None,
    outputs: Sequence[str] = OUTPUTS,
    on_quality_failure: str = "none",
    priors: PriorsFn | None = None,
) -> AnalysisOutputs:
    """Load the files of one series, analyse, encode and write the results to ``out_dir``.

    ``uid_seed`` makes the result UIDs deterministic (see :func:`result_uids`). ``weights``: a
    network weights file for ``model`` (default the shipped one), unless ``segmenter`` is given.
    ``outputs``: which of :data:`OUTPUTS` are written (all by default).

    Raises :class:`~lungburden.dicom_io.volume.SeriesRejected` for input that cannot be
    analysed, including a series without the lungs (:func:`~lungburden.dicom_io.content.check_lungs`)
    and a result refused by the quality checks (:class:`~lungburden.quality.QualityRefused`,
    before and after segmentation); nothing is written in that case, unless
    ``on_quality_failure`` is ``"sr"``: then a refused result is written as an SR without
    measurements that gives the reasons (:func:`write_refusal`) and returned.

    ``priors``: finds the patient's prior studies and their numbers (:mod:`lungburden.followup`);
    the outputs then carry the priors, the change since the most recent one and a trend plot.
    """
    notify = progress or (lambda step: None)
    timings: dict[str, float] = {}
    notify("load")
    start = time.perf_counter()
    volume = load_files(list(files), limits)
    if segmenter is None:
        segmenter = get_segmenter(model, weights=weights)
    model_name = model or getattr(segmenter, "name", None) or segmenter.info.name
    try:
        quality = check_input(volume)
        enforce(volume, quality)
        content = check_lungs(volume, limits.body_part_regex)
        timings["load"] = time.perf_counter() - start
        notify("segment")
        result = analyze_volume(volume, segmenter, model_name)
        enforce(volume, check_result(volume, result.labels, result.quantities, quality, content.notes))
    except QualityRefused as exc:
        if on_quality_failure != "sr":
            raise
        return write_refusal(volume, exc, segmenter.info, model_name, Path(out_dir), uid_seed)
    if priors is not None:
        notify("priors")
        start = time.perf_counter()
        result = replace(result, followup=priors(volume, result.algorithm))
        timings["priors"] = time.perf_counter() - start
    notify("encode")
    start = time.perf_counter()
    encoded = encode_results(result, uid_seed, outputs)
    seg, sr = encoded
    add_to_sr(sr, quality)
    result.timings_s.update(timings, encode=time.perf_counter() - start)
    document = result_document(result, seg, sr, describe_input(volume, content, limits.body_part_regex), quality,
                               encoded)
    seg_path, sr_path, result_path = write_outputs(seg, sr, document, Path(out_dir), encoded)
    log.info(
        "series %s analysed with %s: burden %.2f %% -> SEG %s, SR %s",
        volume.series_instance_uid, model_name, result.quantities.burden_percent,
        seg.SOPInstanceUID, sr.SOPInstanceUID,
    )
    out = Path(out_dir)
    return AnalysisOutputs(
        seg, sr, document, seg_path, sr_path, result_path,
        sc_paths=tuple(sorted((out / SC_DIR).glob("*.dcm"))),
        pdf_path=out / PDF_FILE if encoded.pdf is not None else None,
        report_path=out / PDF_DICOM if encoded.pdf is not None else None,
    )
