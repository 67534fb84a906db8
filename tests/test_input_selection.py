"""Real input accepted: derived axial reformats (ORIGINAL preferred), series chosen by content where
BodyPartExamined misleads, and series without lungs refused with the reason."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SHARED_DATA
from ct_builders import ct_slice, write_ct_series
from pydicom.uid import generate_uid

from lungburden.cli import main
from lungburden.config import config_from_mapping
from lungburden.dicom_io.content import check_lungs, find_lungs
from lungburden.dicom_io.selection import SelectionRules, check_selection, select_series
from lungburden.dicom_io.series import discover_series
from lungburden.dicom_io.volume import CTVolume, SeriesRejected, load_files
from lungburden.jobs.assembly import SeriesAssembler
from lungburden.jobs.queue import JobStore
from lungburden.jobs.spool import Intake, Spool
from lungburden.phantom import PhantomSpec, generate_phantom
from lungburden.pipeline import process_series

REAL_CT = SHARED_DATA / "real-ct"
AVERAGE = ["DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"]


def _real(name: str) -> list[Path]:
    files = sorted((REAL_CT / name).glob("*.dcm"))
    if not files:
        pytest.skip(f"real series {name} not found under {REAL_CT}")
    return files


def _inferior(files: list[Path], n: int) -> list[Path]:
    """The ``n`` most inferior slices of a series (file names need not follow the slice order)."""
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    return [files[i] for i in np.argsort(z)[:n]]


def _rewrite(files: list[Path], out_dir: Path, study_uid: str | None = None, **changes) -> list[Path]:
    """A copy of a real series as a new series (new series, SOP and, unless given, study UIDs) with
    header ``changes`` (None deletes an element); the pixel data are kept as they are."""
    out_dir.mkdir(parents=True)
    series_uid, study_uid = generate_uid(), study_uid or generate_uid()
    written = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in changes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        written.append(out_dir / f"{i:04d}.dcm")
        ds.save_as(written[-1], enforce_file_format=True)
    return written


def _candidate(paths: list[Path]):
    (candidate,) = discover_series(paths)
    return candidate


def _volume(hu: np.ndarray, spacing: tuple[float, float, float], body_part: str | None = None) -> CTVolume:
    """A CTVolume from an array (slice, row, column), most superior slice first, LPS axes."""
    affine = np.eye(4)
    affine[:3, :3] = [[0, 0, spacing[2]], [0, spacing[1], 0], [-spacing[0], 0, 0]]  # columns: slice, row, col
    affine[:3, 3] = (-spacing[2] * hu.shape[2] / 2, -spacing[1] * hu.shape[1] / 2, 0.0)
    header = pydicom.Dataset()
    if body_part:
        header.BodyPartExamined = body_part
    return CTVolume(hu.astype(np.float32), affine, (header,), "1.2.3", "1.2", "1.2.3.4")


def _head(slices: int = 40, size: int = 128) -> np.ndarray:
    """A head: skull (bone), brain, small air sinuses; air around it."""
    yy, xx = np.mgrid[0:size, 0:size] - size / 2
    r = np.hypot(yy, xx / 0.85)
    hu = np.full((slices, size, size), -1000, np.int16)
    hu[:, r < 0.42 * size] = 900
    hu[:, r < 0.38 * size] = 35
    hu[:, (np.hypot(yy + 0.3 * size, xx) < 3)] = -1000  # a sinus
    return hu


# -------------------------------------------------------------------------------- derived axial


def test_derived_axial_reformats_are_accepted_originals_preferred(tmp_path):
    lung = _real("lung-pet-ct-dx-A0001/lung-kernel-L-5mm")
    for value in (AVERAGE, ["DERIVED", "SECONDARY", "AXIAL"], ["DERIVED", "PRIMARY", "AXIAL"]):
        derived = _candidate(_rewrite(lung, tmp_path / "-".join(value), ImageType=value))
        assert check_selection(SelectionRules(), derived) is None, value  # accepted alone
        assert select_series([derived]).best is derived
    # an original of the same study comes first, even a soft-kernel one before a lung-kernel reformat
    soft = _candidate(_real("lung-pet-ct-dx-A0001/soft-kernel-B-5mm"))
    reformat = _candidate(_rewrite(lung, tmp_path / "same", study_uid=soft.study_instance_uid, ImageType=AVERAGE))
    outcome = select_series([reformat, soft])
    assert [c.series_instance_uid for c in outcome.accepted] == [soft.series_instance_uid,
                                                                 reformat.series_instance_uid]
    # the ORIGINAL requirement can still be made strict
    assert "lacks ORIGINAL" in check_selection(SelectionRules(accept_derived_axial=False), reformat)


def test_non_axial_projection_or_gapped_derived_series_are_refused():
    study, frame = generate_uid(), generate_uid()

    def series(orientation, position, image_type, thickness=5.0, step=5.0, **kw):
        uid = generate_uid()
        datasets = [ct_slice(np.zeros((16, 16), np.int16), study_uid=study, series_uid=uid, frame_uid=frame, index=k,
                             position=position(k * step), orientation=orientation, thickness=thickness,
                             ImageType=image_type, **kw) for k in range(20)]
        return _candidate_from(datasets)

    coronal = series((1, 0, 0, 0, 0, -1), lambda d: (0, d, 0), ["DERIVED", "SECONDARY", "MPR"])
    assert "not an axial series (coronal" in check_selection(SelectionRules(), coronal)
    sagittal = series((0, 1, 0, 0, 0, -1), lambda d: (d, 0, 0), ["DERIVED", "SECONDARY", "MPR"])
    assert "not an axial series (sagittal" in check_selection(SelectionRules(), sagittal)
    mip = series((1, 0, 0, 0, 1, 0), lambda d: (0, 0, -d), ["DERIVED", "SECONDARY", "AXIAL", "MIP"],
                 SeriesDescription="Ax slab 10")
    assert "MIP series is a projection" in check_selection(SelectionRules(), mip)
    gapped = series((1, 0, 0, 0, 1, 0), lambda d: (0, 0, -d), AVERAGE, thickness=2.0, step=10.0)
    assert "not contiguous: 2 mm slices every 10 mm" in check_selection(SelectionRules(), gapped)
    localizer = series((1, 0, 0, 0, 0, -1), lambda d: (0, d, 0), ["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert "ImageType contains LOCALIZER" in check_selection(SelectionRules(), localizer)
    outcome = select_series([coronal, sagittal, mip, gapped, localizer])
    assert not outcome.accepted and len(outcome.rejected) == 5


def _candidate_from(datasets):
    from lungburden.dicom_io.series import SeriesCandidate

    first = datasets[0]
    return SeriesCandidate(str(first.SeriesInstanceUID), str(first.StudyInstanceUID),
                           [Path(f"{i}.dcm") for i in range(len(datasets))], list(datasets))


def _node(tmp_path: Path):
    config = config_from_mapping({"node": {"storage_dir": str(tmp_path / "var"), "series_quiet_seconds": 1,
                                           "min_free_disk_mb": 1},
                                  "processing": {"model": "threshold"}, "selection": {"min_slices": 10}})
    store = JobStore.for_storage(config.storage_dir)
    intake = Intake(Spool(config.storage_dir), store)

    def receive(paths):
        for p in paths:
            assert intake.accept(p.read_bytes(), source="test").ok

    return config, store, receive


def _derived(paths: list[Path], image_type=AVERAGE) -> list[Path]:
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.ImageType = image_type
        ds.save_as(p, enforce_file_format=True)
    return paths


def test_node_prefers_the_original_and_analyses_a_derived_series_alone(tmp_path):
    config, store, receive = _node(tmp_path)
    study = generate_uid()
    original = write_ct_series(tmp_path / "orig", slices=12, study_uid=study, kernel="B")
    derived = _derived(write_ct_series(tmp_path / "derived", slices=12, study_uid=study, kernel="L"))
    alone = _derived(write_ct_series(tmp_path / "alone", slices=12, kernel="L"))  # another study
    for paths in (original, derived, alone):
        receive(paths)
    jobs = {j.series_instance_uid: j for j in SeriesAssembler(config, store).poll(now=time.time() + 5)}

    def job(paths):
        return jobs[str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)]

    assert job(original).state == "queued"  # the soft-kernel original beats the lung-kernel reformat
    assert job(derived).state == "skipped"
    assert "original axial series of the same study is preferred" in job(derived).reason
    assert job(alone).state == "queued"
    # a reformat arriving after the original was analysed is compared with it
    late = _derived(write_ct_series(tmp_path / "late", slices=12, study_uid=study, kernel="L"))
    receive(late)
    (skipped,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    assert skipped.state == "skipped" and "already analysed" in skipped.reason
    # a coronal reformat is skipped with the reason
    coronal = write_ct_series(tmp_path / "coronal", slices=12, kernel="L")
    for p in coronal:
        ds = pydicom.dcmread(p)
        ds.ImageType, ds.ImageOrientationPatient = ["DERIVED", "SECONDARY", "MPR"], [1, 0, 0, 0, 0, -1]
        ds.save_as(p, enforce_file_format=True)
    receive(coronal)
    (refused,) = SeriesAssembler(config, store).poll(now=time.time() + 5)
    assert refused.state == "skipped" and "not an axial series (coronal" in refused.reason


@pytest.mark.integration
def test_analyze_derived_reformat_notes_it_in_result_json(tmp_path, capsys):
    lung = _real("lung-pet-ct-dx-A0001/lung-kernel-L-5mm")
    _rewrite(lung, tmp_path / "in", ImageType=AVERAGE, SeriesDescription="CHEST AX")
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "in"), "--out", str(out), "--model", "threshold"]) == 0
    document = json.loads((out / "result.json").read_text())
    assert document["input"]["derived"] is True and document["input"]["image_type"] == AVERAGE
    assert "derived axial reformat analysed: no original axial series qualified" in document["input"]["notes"]
    assert 3000 < document["lung_volume_ml"] < 8000


# -------------------------------------------------------------------------------- content check


@pytest.mark.integration
def test_abdomen_header_with_lungs_is_analysed(tmp_path):
    lung = _real("lung-pet-ct-dx-A0001/lung-kernel-L-5mm")
    files = _rewrite(lung, tmp_path / "in", BodyPartExamined="ABDOMEN")
    assert check_selection(SelectionRules(), _candidate(files)) is None
    outputs = process_series(files, tmp_path / "out", model="threshold")
    document = json.loads(outputs.result_path.read_text())
    info = document["input"]
    assert info["derived"] is False and info["body_part_examined"] == "ABDOMEN"
    assert any("BodyPartExamined 'ABDOMEN': analysed as a chest series" in n for n in info["notes"])
    assert info["lungs"]["right_air_ml"] > 1000 and info["lungs"]["left_air_ml"] > 1000


@pytest.mark.parametrize("body_part", ["ABDOMEN", "CHEST_ABDOMEN", "WHOLEBODY", "", None])
def test_body_part_never_refuses_but_ranks(tmp_path, body_part):
    lung = _real("lung-pet-ct-dx-A0001/lung-kernel-L-5mm")[:20]
    candidate = _candidate(_rewrite(lung, tmp_path / "x", BodyPartExamined=body_part))
    assert check_selection(SelectionRules(), candidate) is None
    if body_part == "ABDOMEN":
        chest = _candidate(_rewrite(lung, tmp_path / "chest", study_uid=candidate.study_instance_uid,
                                    BodyPartExamined="CHEST"))
        assert select_series([candidate, chest]).best is chest


def test_chest_abdomen_series_labelled_abdomen_contains_both_lungs(tmp_path):
    """lidc-idri-0001 (upper abdomen to the apices, JPEG-LS) with BodyPartExamined ABDOMEN."""
    files = _rewrite(_real("lidc-idri-0001"), tmp_path / "in", BodyPartExamined="ABDOMEN")
    volume = load_files(files)
    content = check_lungs(volume)
    assert content.sides == 2 and content.notes == []
    assert content.right_ml > 1000 and content.left_ml > 1000


def test_series_without_lungs_are_refused(tmp_path):
    # an abdomen below the lungs: the lowest 16 slices of a real chest-abdomen scan, in the pipeline
    abdomen = _rewrite(_inferior(_real("lidc-idri-0003"), 16), tmp_path / "abdomen", BodyPartExamined="ABDOMEN")
    with pytest.raises(SeriesRejected, match="contains no lungs"):
        process_series(abdomen, tmp_path / "out", model="threshold")
    assert not (tmp_path / "out").exists()
    # the lung bases only, headed ABDOMEN: refused; headed CHEST: analysed with a note
    bases = _inferior(_real("lidc-idri-0003"), 30)
    with pytest.raises(SeriesRejected, match="contains only the lung bases"):
        check_lungs(load_files(_rewrite(bases, tmp_path / "bases", BodyPartExamined="ABDOMEN")))
    chest = check_lungs(load_files(_rewrite(bases, tmp_path / "bases-chest")))
    assert any("lungs not fully covered" in n for n in chest.notes)
    # a head, built from an array, headed CHEST
    with pytest.raises(SeriesRejected, match="contains no lungs"):
        check_lungs(_volume(_head(), (5.0, 2.0, 2.0), body_part="CHEST"))


def test_cli_reports_a_series_without_lungs(tmp_path, capsys):
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    (tmp_path / "in").mkdir()
    for k, pixels in enumerate(_head(slices=20, size=128)):
        ds = ct_slice(pixels, study_uid=study, series_uid=series, frame_uid=frame, index=k,
                      position=(-128.0, -128.0, -5.0 * k), spacing=(2.0, 2.0), BodyPartExamined="HEAD")
        ds.save_as(tmp_path / "in" / f"{k:03d}.dcm", enforce_file_format=True)
    assert main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", "threshold"]) == 2
    err = capsys.readouterr().err
    assert "contains no lungs" in err and not (tmp_path / "out" / "result.json").exists()


def test_one_lung_only_is_accepted_with_a_note():
    phantom = generate_phantom(PhantomSpec(seed=4, slices=30, rows=128, cols=128, slice_spacing_mm=8.0))
    hu = phantom.hu.copy()
    hu[phantom.left_lung] = 30  # a white left lung (opacified)
    volume = CTVolume(hu.astype(np.float32), phantom.affine, (), "1", "1", "1")
    content = check_lungs(volume)
    assert content.right_found and not content.left_found
    assert any("patient's right only" in n for n in content.notes)


def test_content_check_is_fast():
    """120 slices of 512 x 512 (a real series, each slice twice at half the spacing)."""
    real = load_files(_real("lung-pet-ct-dx-A0001/lung-kernel-L-5mm"))
    affine = real.affine.copy()
    affine[:3, 0] /= 2
    volume = CTVolume(np.repeat(real.hu, 2, axis=0)[:120], affine, real.datasets, "1", "1", "1")
    find_lungs(volume)
    start = time.perf_counter()
    content = find_lungs(volume)
    elapsed = time.perf_counter() - start
    assert content.sides == 2 and volume.shape == (120, 512, 512)
    assert elapsed < 0.6, f"{elapsed:.3f} s"  # ~0.05 s on one core; headroom for a loaded machine
