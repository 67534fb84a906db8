"""The spool: received instances as PS3.10 files, written durably, plus their validation (intake).

Layout: ``<storage_dir>/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
A file is written to a temporary name, ``fsync``-ed, renamed into place and the directory is
``fsync``-ed before the sender is told Success, so an acknowledged instance survives a crash or a
power cut. A re-sent instance (same SOP Instance UID) replaces the earlier file atomically.

:class:`Intake` is shared by the C-STORE SCP and the STOW-RS endpoint: it checks the encoded
bytes without decoding pixel data and maps each problem to a PS3.4 C-STORE status
(Annex B.2.3): 0xA700 Out of Resources, 0xA900 Data Set does not match SOP Class,
0xC000 Cannot understand, 0x0122 SOP Class not supported. Image sizes beyond
:data:`~lungburden.dicom_io.volume.MAX_IMAGE_DIMENSION` / ``MAX_FRAMES`` are refused before any
pixel allocation. Values from the wire are logged through :func:`printable` (control characters
escaped); free-text attributes are never logged.

Files are created 0600 and folders 0700 (the storage folder too): received images are patient data.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.tag import Tag
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage

from lungburden.dicom_io.volume import MAX_FRAMES, MAX_IMAGE_DIMENSION
from lungburden.jobs.logs import audit
from lungburden.jobs.queue import JobStore

log = logging.getLogger(__name__)

#: PS3.4 Annex B.2.3 C-STORE status codes used by the node.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110

#: PS3.5 9.1: at most 64 characters, digits separated by dots, no leading zeros in components.
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

#: Uncompressed transfer syntaxes: the Pixel Data length can be checked against the image size.
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}

_HEADER_TAGS = [Tag(k) for k in (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames", "PixelData",
)]


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(value: object, limit: int = 200) -> str:
    """``value`` as text safe for a log line: control characters escaped (``\\n``, ``\\x1b``),
    at most ``limit`` characters; for anything received from the network."""
    text = value if isinstance(value, str) else str(value)
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text[: limit * 4])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def valid_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and UID_RE.match(text) is not None


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one received instance (C-STORE response status, PS3.4 B.2.3)."""

    status: int
    reason: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable file storage of received instances."""

    def __init__(self, storage_dir: Path, min_free_disk_mb: int = 0):
        self.storage_dir = Path(storage_dir)
        self.root = self.storage_dir / "spool"
        self.storage_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.mkdir(mode=0o700, exist_ok=True)
        for folder in (self.storage_dir, self.root):
            try:
                os.chmod(folder, 0o700)
            except OSError:  # not ours (e.g. a mounted volume): its own permissions apply
                pass
        self.min_free_disk_mb = min_free_disk_mb
        self._free_cache: tuple[float, float] = (0.0, 0.0)
        self._lock = threading.Lock()

    def free_mb(self, max_age: float = 1.0) -> float:
        """Free space of the spool's file system in MiB (cached for ``max_age`` seconds)."""
        now = time.monotonic()
        with self._lock:
            checked_at, free = self._free_cache
            if now - checked_at > max_age:
                free = shutil.disk_usage(self.root).free / 2**20
                self._free_cache = (now, free)
        return free

    def has_room(self, incoming_bytes: int = 0) -> bool:
        return self.free_mb() - incoming_bytes / 2**20 >= self.min_free_disk_mb

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        directory.parent.mkdir(mode=0o700, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        _fsync_dir(directory.parent)
        _fsync_dir(directory.parent.parent)

    def write(self, data: bytes, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Write one PS3.10 file durably (temp file, fsync, rename, fsync directory)."""
        final = self.path_for(study_uid, series_uid, sop_uid)
        self._ensure_dir(final.parent)
        tmp = final.parent / f".{sop_uid}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final

    def iter_files(self) -> Iterator[Path]:
        """Every spooled instance file (temporary files are skipped)."""
        for path in sorted(self.root.glob("*/*/*.dcm")):
            if not path.name.startswith("."):
                yield path

    def clean_temporaries(self) -> int:
        """Delete temporary files left by a crash during a write (their sender got no Success)."""
        n = 0
        for tmp in self.root.glob("*/*/.*.tmp"):
            tmp.unlink(missing_ok=True)
            n += 1
        return n

    def remove_series(self, study_uid: str, series_uid: str) -> None:
        shutil.rmtree(self.root / study_uid / series_uid, ignore_errors=True)
        try:
            (self.root / study_uid).rmdir()
        except OSError:
            pass


class Intake:
    """Validate encoded instances, spool them and register them in the job store.

    ``sop_classes``: the storage SOP classes accepted. Nothing is decoded beyond the header
    elements named in ``_HEADER_TAGS``; the Pixel Data value is only measured.
    """

    def __init__(
        self,
        spool: Spool,
        store: JobStore,
        sop_classes: frozenset[str] = frozenset({CTImageStorage, EnhancedCTImageStorage}),
        on_stored: Callable[[StoreOutcome], None] | None = None,
    ):
        self.spool = spool
        self.store = store
        self.sop_classes = sop_classes
        self.on_stored = on_stored

    def accept(
        self,
        data: bytes,
        source: str,
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
    ) -> StoreOutcome:
        """Check and store one PS3.10 encoded instance (preamble + File Meta + data set).

        Never raises for bad input: every problem becomes a failure status with a reason.
        """
        try:
            outcome = self._accept(data, source, expected_sop_class, expected_sop_instance)
        except OSError as exc:
            outcome = StoreOutcome(OUT_OF_RESOURCES, f"cannot write the instance to the spool ({exc.strerror or exc})")
        except Exception as exc:  # noqa: BLE001 - a malformed data set must never crash the node
            log.error("unexpected error while storing an instance from %s: %s", printable(source),
                      printable(f"{type(exc).__name__}: {exc}"))
            outcome = StoreOutcome(PROCESSING_FAILURE, f"processing failure ({type(exc).__name__})")
        audit("instance_received" if outcome.ok else "instance_refused", source, status=f"0x{outcome.status:04X}",
              study_instance_uid=outcome.study_instance_uid, series_instance_uid=outcome.series_instance_uid,
              sop_instance_uid=outcome.sop_instance_uid or expected_sop_instance, sop_class_uid=outcome.sop_class_uid,
              outcome="stored" if outcome.ok else outcome.reason)
        if outcome.ok:
            log.debug("stored %s (series %s) from %s", outcome.sop_instance_uid, outcome.series_instance_uid,
                      printable(source))
            if self.on_stored is not None:
                self.on_stored(outcome)
        else:
            log.warning(
                "refused instance %s from %s: 0x%04X %s",
                printable(outcome.sop_instance_uid or expected_sop_instance or "?"), printable(source),
                outcome.status, printable(outcome.reason, 300),
            )
        return outcome

    def _accept(
        self, data: bytes, source: str, expected_sop_class: str | None, expected_sop_instance: str | None
    ) -> StoreOutcome:
        if not self.spool.has_room(len(data)):
            return StoreOutcome(
                OUT_OF_RESOURCES,
                f"less than {self.spool.min_free_disk_mb} MiB free in the spool ({self.spool.free_mb():.0f} MiB)",
                expected_sop_class or "", expected_sop_instance or "",
            )
        try:
            ds = pydicom.dcmread(io.BytesIO(data), specific_tags=_HEADER_TAGS)
            # Element values are converted lazily: a corrupt VR or value fails here, not later.
            sop_class = str(ds.get("SOPClassUID", "") or "")
            sop_uid = str(ds.get("SOPInstanceUID", "") or "")
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
            series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for corrupt input
            return StoreOutcome(CANNOT_UNDERSTAND, f"data set cannot be parsed ({type(exc).__name__}: {exc})"[:300],
                                expected_sop_class or "", expected_sop_instance or "")

        def fail(status: int, reason: str) -> StoreOutcome:
            return StoreOutcome(status, reason, sop_class or expected_sop_class or "",
                                sop_uid or expected_sop_instance or "", study_uid, series_uid)

        if not sop_class:
            return fail(CANNOT_UNDERSTAND, "no SOP Class UID in the data set")
        if sop_class not in self.sop_classes:
            name = UID(sop_class).name if valid_uid(sop_class) else sop_class[:64]
            return fail(SOP_CLASS_NOT_SUPPORTED, f"SOP class {name} is not accepted by this node")
        if expected_sop_class and sop_class != expected_sop_class:
            return fail(DATASET_MISMATCH, f"data set SOP class {sop_class} differs from the request's "
                                          f"Affected SOP Class {expected_sop_class}")
        if expected_sop_instance and sop_uid != expected_sop_instance:
            return fail(DATASET_MISMATCH, "data set SOP Instance UID differs from the request's Affected SOP Instance")
        for keyword, value in (("SOPInstanceUID", sop_uid), ("StudyInstanceUID", study_uid),
                               ("SeriesInstanceUID", series_uid)):
            if not valid_uid(value):
                return fail(DATASET_MISMATCH, f"missing or invalid {keyword} {value[:70]!r}")
        try:
            pixel_problem = self._check_pixels(ds)
        except Exception as exc:  # noqa: BLE001 - corrupt header values
            return fail(CANNOT_UNDERSTAND, f"image attributes cannot be read ({type(exc).__name__})")
        if pixel_problem:
            return fail(DATASET_MISMATCH, pixel_problem)
        path = self.spool.write(data, study_uid, series_uid, sop_uid)
        self.store.record_instance(sop_uid, series_uid, study_uid, sop_class, path, source)
        return StoreOutcome(SUCCESS, "", sop_class, sop_uid, study_uid, series_uid, path)

    @staticmethod
    def _check_pixels(ds: pydicom.Dataset) -> str | None:
        if "PixelData" not in ds:
            return "no Pixel Data (7FE0,0010), or the data set is truncated"
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
            bits = int(ds.BitsAllocated)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (AttributeError, TypeError, ValueError):
            return "missing or invalid Rows/Columns/Bits Allocated"
        if rows < 1 or cols < 1 or bits not in (8, 16, 32):
            return f"implausible image size {rows}x{cols}, {bits} bits allocated"
        if rows > MAX_IMAGE_DIMENSION or cols > MAX_IMAGE_DIMENSION or not 1 <= frames <= MAX_FRAMES \
                or samples not in (1, 3):
            return (f"image size {rows}x{cols}, {frames} frames, {samples} samples beyond the limits "
                    f"({MAX_IMAGE_DIMENSION}x{MAX_IMAGE_DIMENSION}, {MAX_FRAMES} frames)")
        pixel_data = ds.PixelData
        if not pixel_data:
            return "Pixel Data (7FE0,0010) is empty"
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        if transfer_syntax in _NATIVE or not transfer_syntax:
            expected = rows * cols * samples * frames * bits // 8
            if len(pixel_data) < expected:
                return f"Pixel Data holds {len(pixel_data)} bytes, {expected} expected: the data set is truncated"
        else:
            from pydicom.encaps import generate_fragments

            try:
                # The first item is the Basic Offset Table (PS3.5 A.4), possibly empty.
                fragments = list(generate_fragments(pixel_data))[1:]
            except Exception as exc:  # noqa: BLE001
                return f"encapsulated Pixel Data cannot be parsed ({exc})"[:300]
            if not fragments:
                return "encapsulated Pixel Data has no fragments"
            if transfer_syntax == "1.2.840.10008.1.2.5":
                # PS3.5 G: one fragment per frame, each a 64-byte header of 1-15 segment offsets.
                if len(fragments) < frames:
                    return f"RLE Pixel Data has {len(fragments)} fragments for {frames} frames"
                for fragment in fragments[:frames]:
                    segments = int.from_bytes(fragment[:4], "little") if len(fragment) >= 64 else 0
                    if not 1 <= segments <= 15 or int.from_bytes(fragment[4:8], "little") != 64:
                        return "RLE Pixel Data fragment without a valid RLE header"
        return None


def recover(spool: Spool, store: JobStore) -> int:
    """Register spooled files the database does not know (lost with an unsynced WAL tail)."""
    removed = spool.clean_temporaries()
    if removed:
        log.info("removed %d temporary files of interrupted writes", removed)
    known = store.known_paths()
    added = 0
    for path in spool.iter_files():
        if str(path) in known:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=[Tag("SOPClassUID"), Tag("SOPInstanceUID"),
                                                Tag("StudyInstanceUID"), Tag("SeriesInstanceUID")])
            store.record_instance(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID),
                                  str(ds.SOPClassUID), path, "recovered")
            added += 1
        except Exception as exc:  # noqa: BLE001
            log.warning("spooled file %s is unreadable (%s); moved aside", path.name, exc)
            path.rename(path.with_name(f".{path.name}.bad"))
    if added:
        log.info("recovered %d spooled instances unknown to the database", added)
    return added


def purge_finished(spool: Spool, store: JobStore, cutoff: float) -> int:
    """Retention: delete the spooled instances and the result files of the finished series older
    than ``cutoff`` (their job records stay); returns how many series were purged."""
    n = 0
    for s in store.finished_series_before(cutoff):
        spool.remove_series(s.study_instance_uid, s.series_instance_uid)
        for job in store.jobs(series_instance_uid=s.series_instance_uid):
            if job.result_dir is not None:
                shutil.rmtree(job.result_dir, ignore_errors=True)
        store.forget_instances(s.series_instance_uid)
        n += 1
    return n
