"""The outputs in a real viewer: OHIF in headless Chromium, reading them from a real Orthanc.

For the phantom (``lungburden phantom --seed 7``) and the real study A0001, the CT series and
every output of ``lungburden analyze`` are stored in Orthanc. OHIF (the published ``@ohif/app``
build, served with Orthanc's DICOMweb on one origin by :mod:`viewer.ohif`) runs in Chromium,
driven over the DevTools protocol (:mod:`viewer.chromium`), as a user would use it:

* the SEG is opened ("Yes" to OHIF's prompt); on several slices the pixels whose colour changes
  when the overlay is switched on must be the SEG's own pixels of that slice, mapped to the
  screen through the CT geometry and the viewer's world-to-canvas transform, per segment and all
  together; the same comparison must reject the SEG's masks flipped left-right and front-back,
  and a left-right mirrored copy of the SEG stored in Orthanc and opened in OHIF must fail it;
* the SR is opened: OHIF's SR viewport must show every volume, ratio and the burden, with no
  uncaught error or ``TypeError`` in the browser console;
* the Secondary Capture series is opened and an image with the burned-in overlay is displayed;
* the encapsulated PDF is opened: OHIF's PDF viewport holds the bytes of ``report.pdf``.

A failing test names the folder with its screenshots and the browser console log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from ct_builders import is_dicom
from orthanc import OrthancServer, orthanc_available
from PIL import Image
from pydicom.pixels import pack_bits
from pydicom.uid import generate_uid
from viewer.chromium import Chromium, find_chromium
from viewer.ohif import OHIF_VERSION, OhifServer, ensure_dist
from viewer.overlay import ScreenMapping, agreement, overlay_pixels, pixel_to_patient, screen_affine

from lungburden.cli import main as lungburden_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEGMENTS = {1: "lung field", 2: "ground glass opacity", 3: "high opacity"}
THUMBNAILS = '[data-cy^="study-browser-thumbnail"]'
#: Series description of the left-right mirrored copy of a SEG that the viewer test must reject.
MIRRORED = "MIRRORED TEST COPY"


def _missing(what: str) -> None:
    """Skip where a component cannot exist; on CI every one must be there (``make test`` installs them)."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (make test installs it)")
    pytest.skip(what)


# -- the page side ------------------------------------------------------------------------------
# window.services and window.cornerstone are what OHIF itself exposes for its end-to-end tests.

ACTIVE_VIEWPORT = """
  const vid = window.services.viewportGridService.getState().activeViewportId;
  const vp = window.services.cornerstoneViewportService.getCornerstoneViewport(vid);
"""

SHOW_SLICE = """(async () => {""" + ACTIVE_VIEWPORT + """
  const ids = vp.getImageIds();
  const uidOf = id => (window.cornerstone.metaData.get('sopCommonModule', id) || {}).sopInstanceUID;
  const index = ids.findIndex(id => uidOf(id) === %(uid)s);
  if (index < 0) return null;
  await vp.setImageIdIndex(index);
  vp.render();
  await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
  const r = vp.canvas.getBoundingClientRect();
  return {shown: uidOf(vp.getCurrentImageId()), rect: [r.x, r.y, r.width, r.height],
          points: %(points)s.map(p => Array.from(vp.worldToCanvas(p)))};
})()"""

SEGMENT_VISIBILITY = """(() => {""" + ACTIVE_VIEWPORT + """
  const service = window.services.segmentationService;
  const id = service.getSegmentations()[0].segmentationId;
  for (const [segment, visible] of Object.entries(%s)) service.setSegmentVisibility(vid, id, Number(segment), visible);
  return true;
})()"""

SEG_LOADED = """(() => {""" + ACTIVE_VIEWPORT + """
  const service = window.services.segmentationService;
  const segmentations = service.getSegmentations();
  return segmentations.length > 0 && service.getSegmentationRepresentations(vid).length > 0
    && Object.keys(segmentations[0].segments).length;
})()"""

VIEWPORT_SERIES = """(() => {""" + ACTIVE_VIEWPORT + """
  if (!vp || !vp.getCurrentImageId || !vp.getCurrentImageId()) return null;
  const series = window.cornerstone.metaData.get('generalSeriesModule', vp.getCurrentImageId());
  const r = vp.canvas.getBoundingClientRect();
  return {series: series && series.seriesInstanceUID, rect: [r.x, r.y, r.width, r.height]};
})()"""

# Every image of the viewport in the cache: OHIF has finished loading the series it shows first
# (switching series while it still loads can make OHIF scroll a viewport it has just destroyed).
VIEWPORT_LOADED = """(() => {""" + ACTIVE_VIEWPORT + """
  if (!vp || !vp.getImageIds) return false;
  const ids = vp.getImageIds();
  return ids.length > 0 && ids.every(id => window.cornerstone.cache.isLoaded(id));
})()"""

SVG_TEXT = "Array.from(document.querySelectorAll('svg text')).map(e => e.textContent).filter(t => t.trim())"


# -- environment: one Orthanc, one OHIF, one browser for the module ------------------------------
@dataclass
class Viewer:
    orthanc: OrthancServer
    server: OhifServer
    browser: Chromium
    artefacts: Path

    def open_study(self, study_uid: str, series_count: int) -> None:
        self.browser.console.clear()
        self.browser.navigate(f"{self.server.url}/viewer?StudyInstanceUIDs={study_uid}")
        self.browser.wait_for(f"document.querySelectorAll('{THUMBNAILS}').length >= {series_count}", 90,
                              what="the study browser")
        self.browser.wait_for(VIEWPORT_SERIES, 60, what="the first image")
        self.browser.wait_for(VIEWPORT_LOADED, 90, what="the first series to load")

    def element_centre(self, selector_js: str) -> tuple[float, float] | None:
        found = self.browser.evaluate(
            f"(() => {{ const e = {selector_js}; if (!e) return null; const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        return tuple(found) if found else None

    def open_series(self, modality: str, mirrored: bool = False) -> None:
        """Double-click the study browser's entry of the series of ``modality`` (the mirrored
        test copy of the SEG, or any other series of that modality)."""
        thumbnail = (
            f"Array.from(document.querySelectorAll('{THUMBNAILS}'))"
            f".find(e => e.innerText.trim().startsWith({json.dumps(modality + chr(10))})"
            f" && e.innerText.includes({json.dumps(MIRRORED)}) === {json.dumps(mirrored)})"
        )
        centre = self.element_centre(thumbnail)
        assert centre is not None, f"no {modality} series in OHIF's study browser"
        self.browser.click(*centre, count=2)

    @staticmethod
    def button(text: str) -> str:
        return f"Array.from(document.querySelectorAll('button')).find(e => e.innerText.trim() === {json.dumps(text)})"

    def stable_screenshot(self, clip: tuple[int, int, int, int] | None = None, attempts: int = 8) -> np.ndarray:
        """A screenshot (of ``clip``) once two in a row agree (rendering has settled)."""
        previous = self.browser.screenshot(clip)
        for _ in range(attempts):
            time.sleep(0.1)
            current = self.browser.screenshot(clip)
            if np.array_equal(current, previous):
                return current
            previous = current
        return previous

    def console_errors(self) -> list[str]:
        return [str(m) for m in self.browser.errors() if m.level != "log-warning"] + [
            str(m) for m in self.browser.console if m.level in ("error", "assert", "log-error")
        ]

    @contextlib.contextmanager
    def evidence(self, name: str):
        """On failure: a screenshot, the browser console and the HTTP requests in ``artefacts/name``."""
        folder = self.artefacts / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            yield folder
        except Exception as error:
            with contextlib.suppress(Exception):
                self.browser.save_screenshot(folder / "failure.png")
            (folder / "console.log").write_text("\n".join(str(m) for m in self.browser.console))
            (folder / "requests.log").write_text("\n".join(self.server.requests))
            raise AssertionError(f"{error}\n(screenshots and browser console: {folder})") from error


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    if not orthanc_available():
        _missing("Orthanc with the DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb)")
    if find_chromium() is None:
        _missing("Chromium is not installed (Debian package chromium)")
    try:
        dist = ensure_dist()
    except RuntimeError as error:
        _missing(f"OHIF {OHIF_VERSION} is not available: {error}")
    root = tmp_path_factory.mktemp("viewer")
    with OrthancServer(root / "orthanc") as orthanc, OhifServer(dist, orthanc.http_port) as server:
        browser = Chromium(root / "chromium", width=1100, height=760).start()
        try:
            # OHIF's first-visit tour would cover the viewport: mark it as seen, as a returning user.
            browser.call("Page.addScriptToEvaluateOnNewDocument",
                         {"source": "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))"})
            yield Viewer(orthanc, server, browser, root / "artefacts")
        finally:
            browser.stop()


# -- the studies ---------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    result: dict
    ct: dict[str, pydicom.Dataset]  # headers by SOP Instance UID
    order: list[str]  # SOP Instance UIDs from foot to head
    seg_pixels: np.ndarray  # (slice in ``order``, row, column, segment 1..3), from the SEG itself
    series_count: int
    sc_series_uid: str
    out: Path  # the analyze command's output folder


def _analysed_case(name: str, source: Path, out: Path, viewer: Viewer) -> Case:
    assert lungburden_cli(["analyze", str(source), "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    ct = {}
    for path in sorted(p for p in source.rglob("*") if p.is_file() and is_dicom(p)):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SeriesInstanceUID == result["series_instance_uid"]:
            ct[str(ds.SOPInstanceUID)] = ds
            viewer.orthanc.upload(path)
    outputs = sorted(p for p in out.rglob("*.dcm"))
    for path in outputs:
        viewer.orthanc.upload(path)
    order = sorted(ct, key=lambda uid: float(ct[uid].ImagePositionPatient[2]))
    seg = hd.seg.segread(out / "seg.dcm")
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=order, segment_numbers=list(SEGMENTS))
    series = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in outputs}
    return Case(name, result, ct, order, pixels.astype(bool), len(series) + 1, result["sc_series_instance_uid"], out)


@pytest.fixture(scope="module")
def phantom_case(viewer, tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    assert lungburden_cli(["phantom", str(root / "ct"), "--seed", "7"]) == 0
    return _analysed_case("phantom", root / "ct", root / "out", viewer)


@pytest.fixture(scope="module")
def real_case(viewer, real_study, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return _analysed_case("real", real_study / "lung-kernel-L-5mm", root / "out", viewer)


@pytest.fixture(params=["phantom", "real"])
def case(request) -> Case:
    return request.getfixturevalue(f"{request.param}_case")


# -- SEG -----------------------------------------------------------------------------------------
def _slices_to_check(pixels: np.ndarray) -> list[int]:
    """The slice of most opacity, of most lung, and one a quarter into the lung field's extent."""
    lung = pixels[..., 0].sum(axis=(1, 2))
    opacity = pixels[..., 1:].sum(axis=(1, 2, 3))
    with_lung = np.flatnonzero(lung)
    chosen = [int(np.argmax(opacity))] if opacity.any() else []
    chosen += [int(np.argmax(lung)), int(with_lung[0] + (with_lung[-1] - with_lung[0]) // 4)]
    return list(dict.fromkeys(chosen))


def _compare(drawn: dict, masks: dict, mapping: ScreenMapping) -> list:
    return [agreement(str(key), screen, mapping.mask(masks[key])) for key, screen in drawn.items()]


def _open_seg(viewer: Viewer, mirrored: bool = False) -> None:
    viewer.open_series("SEG", mirrored)
    # OHIF asks "Do you want to open this Segmentation?" (Yes / No) before it loads it.
    yes = viewer.button("Yes")
    viewer.browser.wait_for(f"{yes} !== undefined || {SEG_LOADED}", 60, what="OHIF's prompt to open the SEG")
    if viewer.browser.evaluate(f"{yes} !== undefined"):
        viewer.browser.click(*viewer.element_centre(yes))
    viewer.browser.wait_for(SEG_LOADED, 90, what="the segmentation in the viewport")


def _overlay_agreement(viewer: Viewer, case: Case, folder: Path) -> tuple[list[str], bool, bool, bool]:
    """Per checked slice, what the viewer draws against the SEG's own pixels of that slice:
    the report lines, whether every slice agrees, whether every slice drew an overlay, and whether
    the SEG's masks mirrored left-right or front-back would agree too on any slice (they must not,
    or the comparison could not tell a mirrored overlay)."""
    browser = viewer.browser
    report, agree, drew, mirror_agrees = [], True, True, False
    for k in _slices_to_check(case.seg_pixels):
        ds = case.ct[case.order[k]]
        points = [pixel_to_patient(ds, 0, 0), pixel_to_patient(ds, 1, 0), pixel_to_patient(ds, 0, 1)]
        view = browser.evaluate(SHOW_SLICE % {"uid": json.dumps(case.order[k]), "points": json.dumps(points)})
        assert view and view["shown"] == case.order[k], f"OHIF did not show CT slice {k}"
        region = tuple(int(round(v)) for v in view["rect"])
        mapping = ScreenMapping(screen_affine(view["points"], view["rect"][:2]), region,
                                (int(ds.Rows), int(ds.Columns)))

        # The whole overlay, each lesion segment alone (the lung field holds them), and none.
        shots = {}
        for key, visible in [("all", set(SEGMENTS)), (2, {2}), (3, {3}), ("off", set())]:
            browser.evaluate(SEGMENT_VISIBILITY % json.dumps({s: s in visible for s in SEGMENTS}))
            shots[key] = viewer.stable_screenshot(region)
        browser.evaluate(SEGMENT_VISIBILITY % json.dumps({s: True for s in SEGMENTS}))
        drawn = {key: overlay_pixels(shot, shots["off"]) for key, shot in shots.items() if key != "off"}

        masks = {s: case.seg_pixels[k, :, :, s - 1] for s in (2, 3)}
        masks["all"] = case.seg_pixels[k].any(axis=-1)
        result = _compare(drawn, masks, mapping)
        flipped_lr = _compare(drawn, {key: m[:, ::-1] for key, m in masks.items()}, mapping)
        flipped_ap = _compare(drawn, {key: m[::-1, :] for key, m in masks.items()}, mapping)
        report.append(f"slice {k}: " + "; ".join(map(str, result)))
        report.append(f"slice {k}, SEG flipped left-right: " + "; ".join(map(str, flipped_lr)))
        report.append(f"slice {k}, SEG flipped front-back: " + "; ".join(map(str, flipped_ap)))

        diff = shots["all"].copy()
        expected_all = mapping.mask(masks["all"])
        diff[drawn["all"] & ~expected_all] = (255, 0, 255)  # drawn, not in the SEG
        diff[expected_all & ~drawn["all"]] = (0, 255, 0)  # in the SEG, not drawn
        Image.fromarray(diff).save(folder / f"slice-{k:03d}-mismatch.png")
        Image.fromarray(shots["all"]).save(folder / f"slice-{k:03d}-overlay-on.png")
        Image.fromarray(shots["off"]).save(folder / f"slice-{k:03d}-overlay-off.png")

        drew = drew and drawn["all"].sum() > 100
        agree = agree and all(a.ok for a in result)
        mirror_agrees = mirror_agrees or all(a.ok for a in flipped_lr) or all(a.ok for a in flipped_ap)
    (folder / "agreement.txt").write_text("\n".join(report) + "\n")
    return report, agree, drew, mirror_agrees


def test_seg_overlay_lines_up_with_seg_pixels(viewer, case):
    with viewer.evidence(f"{case.name}-seg") as folder:
        viewer.open_study(case.result["study_instance_uid"], case.series_count)
        _open_seg(viewer)
        report, agree, drew, mirror_agrees = _overlay_agreement(viewer, case, folder)
        assert drew, "no overlay drawn\n" + "\n".join(report)
        assert agree, "\n".join(report)
        assert not mirror_agrees, "the comparison cannot tell a mirrored overlay:\n" + "\n".join(report)
        assert viewer.console_errors() == []


def _mirrored_seg(seg_path: Path, out: Path) -> Path:
    """A copy of the SEG with every frame mirrored left-right, as a new series of the study."""
    ds = pydicom.dcmread(seg_path)
    frames = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
    ds.PixelData = pack_bits(np.ascontiguousarray(frames[:, :, ::-1]).ravel())
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesNumber = int(ds.SeriesNumber) + 50
    ds.SeriesDescription = MIRRORED
    ds.save_as(out, enforce_file_format=True)
    return out


def test_mirrored_seg_fails_the_overlay_check(viewer, phantom_case, tmp_path):
    """A SEG whose pixels are mirrored left-right, stored in Orthanc and opened in OHIF, must
    fail the same screen-against-SEG comparison that the shipped SEG passes."""
    case = phantom_case
    viewer.orthanc.upload(_mirrored_seg(case.out / "seg.dcm", tmp_path / "mirrored-seg.dcm"))
    with viewer.evidence(f"{case.name}-mirrored-seg") as folder:
        viewer.open_study(case.result["study_instance_uid"], case.series_count + 1)
        _open_seg(viewer, mirrored=True)
        report, agree, drew, _ = _overlay_agreement(viewer, case, folder)
        assert drew, "OHIF drew no overlay for the mirrored SEG\n" + "\n".join(report)
        assert not agree, "a left-right mirrored SEG passed the overlay check:\n" + "\n".join(report)


def _open_case_series(viewer: Viewer, case: Case, modality: str) -> None:
    """The case's study in OHIF, with its series of ``modality`` in the viewport."""
    viewer.open_study(case.result["study_instance_uid"], case.series_count)
    viewer.open_series(modality)


# -- SR ------------------------------------------------------------------------------------------
NUMBER = re.compile(r"(Volume Ratio|Volume|Attenuation Coefficient): (-?\d+(?:\.\d+)?) (cm3|%|\[hnsf'U\])")


def _expected_numbers(result: dict) -> dict[str, tuple[str, float, str]]:
    numbers = {
        "lung volume": ("Volume", result["lung_volume_ml"], "cm3"),
        "left lung volume": ("Volume", result["left_lung_volume_ml"], "cm3"),
        "right lung volume": ("Volume", result["right_lung_volume_ml"], "cm3"),
        "GGO volume": ("Volume", result["ggo_volume_ml"], "cm3"),
        "GGO % of lung": ("Volume Ratio", result["ggo_percent"], "%"),
        "high opacity volume": ("Volume", result["high_opacity_volume_ml"], "cm3"),
        "high opacity % of lung": ("Volume Ratio", result["high_opacity_percent"], "%"),
        "opacity volume": ("Volume", result["opacity_volume_ml"], "cm3"),
        "burden": ("Volume Ratio", result["burden_percent"], "%"),
    }
    for key, name in (("ggo_mean_hu", "GGO mean HU"), ("high_opacity_mean_hu", "high opacity mean HU")):
        if result.get(key) is not None:
            numbers[name] = ("Attenuation Coefficient", result[key], "[hnsf'U]")
    return numbers


def test_sr_shows_volumes_and_burden(viewer, case):
    browser = viewer.browser
    with viewer.evidence(f"{case.name}-sr") as folder:
        _open_case_series(viewer, case, "SR")
        browser.wait_for(f"{SVG_TEXT}.some(t => t.includes('Volume'))", 60, what="SR measurements in the viewport")
        arrows = "document.querySelector('[data-cy=\"viewport-action-arrows-right\"]')"
        seen: list[str] = []
        for step in range(6):  # OHIF steps through the SR's measurements one key slice at a time
            time.sleep(0.7)
            texts = browser.evaluate(SVG_TEXT)
            seen.extend(t for t in texts if t not in seen)
            browser.save_screenshot(folder / f"sr-measurement-{step + 1}.png")
            centre = viewer.element_centre(arrows)
            assert centre is not None, "OHIF's SR viewport has no measurement navigation"
            browser.click(*centre)
        (folder / "sr-text.txt").write_text("\n".join(seen) + "\n")
        shown = [(name, float(value), unit) for name, value, unit in NUMBER.findall(" ".join(seen))]
        missing = [
            label for label, (name, value, unit) in _expected_numbers(case.result).items()
            if not any(n == name and u == unit and abs(v - value) <= 0.006 for n, v, u in shown)
        ]
        assert not missing, f"not shown by OHIF: {missing}; shown: {seen}"
        assert viewer.console_errors() == [], "\n".join(viewer.console_errors())


# -- SC ------------------------------------------------------------------------------------------
def test_secondary_capture_displayed(viewer, case):
    browser = viewer.browser
    with viewer.evidence(f"{case.name}-sc") as folder:
        _open_case_series(viewer, case, "OT")
        sc_uid = json.dumps(case.sc_series_uid)
        shown = browser.wait_for(
            f"(() => {{ const v = {VIEWPORT_SERIES}; return v && v.series === {sc_uid} && v; }})()",
            60, what="the key image series in the viewport",
        )
        shot = viewer.stable_screenshot()
        Image.fromarray(shot).save(folder / "sc.png")
        x, y, w, h = (int(round(v)) for v in shown["rect"])
        image = shot[y:y + h, x:x + w].astype(int)
        red, blue = image[..., 0], image[..., 2]
        overlay = ((red > 150) & (blue < 120) & (red - blue > 80)).sum()  # burned-in yellow / red overlay
        assert image.std() > 20, "the viewport is blank"
        assert overlay > 200, f"no burned-in overlay colours on screen ({overlay} pixels)"
        assert viewer.console_errors() == [], "\n".join(viewer.console_errors())


# -- PDF -----------------------------------------------------------------------------------------
PDF_OBJECT = "document.querySelector('object[type=\"application/pdf\"]')"
PDF_BYTES = "(async () => { const data = " + PDF_OBJECT + """.data;
  const bytes = new Uint8Array(await (await fetch(data)).arrayBuffer());
  return {head: String.fromCharCode(...bytes.slice(0, 5)), size: bytes.length};
})()"""


def test_pdf_report_displayed(viewer, case):
    browser = viewer.browser
    with viewer.evidence(f"{case.name}-pdf") as folder:
        _open_case_series(viewer, case, "DOC")
        browser.wait_for(f"{PDF_OBJECT} && {PDF_OBJECT}.data", 60, what="OHIF's PDF viewport")
        shown = browser.evaluate(PDF_BYTES)
        browser.save_screenshot(folder / "pdf.png")
        expected = (case.out / "report.pdf").read_bytes()
        assert shown["head"] == "%PDF-", f"OHIF's PDF viewport holds no PDF: {shown}"
        # Encapsulated Document is padded to an even length (PS3.5 7.1): at most one byte more.
        assert 0 <= shown["size"] - len(expected) <= 1, f"{shown['size']} bytes shown, report.pdf has {len(expected)}"
        assert viewer.console_errors() == [], "\n".join(viewer.console_errors())
