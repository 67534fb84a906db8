"""Find DICOM series in files and folders (PS3.10 files), grouping instances by SeriesInstanceUID.

Only headers are read here (``stop_before_pixels``); pixel data are decoded when the selected
series is loaded (:mod:`lungburden.dicom_io.volume`). Files that are not DICOM are skipped with a
log line naming the file, never an exception.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

log = logging.getLogger(__name__)


@dataclass
class SeriesCandidate:
    """The files and headers of one series found on disk (headers in file order, no pixels)."""

    series_instance_uid: str
    study_instance_uid: str
    files: list[Path] = field(default_factory=list)
    headers: list[Dataset] = field(default_factory=list)

    @property
    def first(self) -> Dataset:
        return self.headers[0]

    def describe(self) -> str:
        """One line for logs and messages: UIDs and technical attributes, no patient data."""
        h = self.first
        return (
            f"series {self.series_instance_uid} ({h.get('Modality', '?')}, {len(self.files)} instances, "
            f"kernel {header_text(h.get('ConvolutionKernel'))}, '{h.get('SeriesDescription', '')}')"
        )


def header_text(value: object) -> str:
    """A header value as text for reasons and logs: multi-valued joined by backslashes, "?" if absent."""
    if value is None:
        return "?"
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


def iter_files(inputs: Path | Sequence[Path]) -> Iterable[Path]:
    """Every regular file under the given files/folders (recursively, sorted, hidden files skipped)."""
    roots = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    for root in map(Path, roots):
        if root.is_file():
            yield root
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):
                    yield Path(dirpath) / name


def read_header(path: Path) -> Dataset:
    """Read a DICOM header; raise :class:`InvalidDicomError` for anything that is not a DICOM instance."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        # Files without the PS3.10 preamble (raw datasets) are accepted if they parse as an image.
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not DICOM"
            raise InvalidDicomError(f"not a DICOM file ({exc})") from exc
        if "SOPClassUID" not in ds:
            raise InvalidDicomError("not a DICOM file (no DICM preamble, no SOP Class UID)") from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt files raise many types
        raise InvalidDicomError(f"unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    return ds


def discover_series(
    inputs: Path | Sequence[Path], skipped: list[SkippedFile] | None = None
) -> list[SeriesCandidate]:
    """Group the DICOM files under ``inputs`` by series; non-DICOM files are logged and skipped.

    ``skipped`` (if given) receives every skipped file with its reason.
    """
    by_series: dict[str, SeriesCandidate] = {}
    for path in iter_files(inputs):
        try:
            header = read_header(path)
            series_uid = str(header.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError) as exc:
            reason = str(exc) if isinstance(exc, InvalidDicomError) else "no SeriesInstanceUID"
            log.info("skipping %s: %s", path, reason)
            if skipped is not None:
                skipped.append(SkippedFile(path, reason))
            continue
        candidate = by_series.get(series_uid)
        if candidate is None:
            candidate = by_series[series_uid] = SeriesCandidate(
                series_uid, str(header.get("StudyInstanceUID", ""))
            )
        candidate.files.append(path)
        candidate.headers.append(header)
    return list(by_series.values())
