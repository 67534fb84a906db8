"""The configuration of a lungburden node as typed dataclasses, with defaults for everything optional.

One YAML file maps onto :class:`Config` (see ``config/lungburden.example.yaml`` and docs/node.md);
:mod:`lungburden.config.loader` validates it. Each section class has a ``check()`` method that
returns ``(key, value, message)`` tuples for values of the right type but out of range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from lungburden.dicom_io.selection import SelectionRules
from lungburden.dicom_io.volume import LoadLimits

_RULES = SelectionRules()
_LIMITS = LoadLimits()

#: PS3.5 6.2: AE titles are at most 16 characters of the default repertoire, no backslash, no
#: control characters; leading/trailing spaces are not significant.
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")

Problem = tuple[str, object, str]


def _check_ae(key: str, value: str) -> list[Problem]:
    if not _AE_RE.match(value) or not value.strip():
        return [(key, value, "must be 1-16 printable ASCII characters without a backslash (PS3.5 6.2 AE)")]
    return []


def _check_port(key: str, value: int, allow_zero: bool = False) -> list[Problem]:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        return [(key, value, f"must be a TCP port number ({low}-65535)")]
    return []


def _check_regex(key: str, value: str | None) -> list[Problem]:
    if value is None:
        return []
    try:
        re.compile(value)
    except re.error as exc:
        return [(key, value, f"is not a valid regular expression ({exc})")]
    return []


@dataclass
class NodeConfig:
    """The DICOM node (SCP) itself."""

    ae_title: str = "LUNGBURDEN"
    host: str = "0.0.0.0"
    port: int = 11112
    #: Spool, job database and results live here (created at start).
    storage_dir: Path = Path("./var")
    #: Calling AE titles allowed to associate; empty = accept any.
    allowed_calling_aets: list[str] = field(default_factory=list)
    #: A series is complete after this many seconds without a new instance (for it or its study).
    series_quiet_seconds: float = 15.0
    #: Inference worker processes.
    workers: int = 1
    #: Simultaneous associations accepted; further requests are rejected (transient).
    max_associations: int = 8
    #: C-STORE is refused with 0xA700 (Out of Resources) below this much free space in storage_dir.
    min_free_disk_mb: int = 1024
    #: Also negotiate Enhanced CT Image Storage (multi-frame). Off by default: the pipeline analyses
    #: CT Image Storage only, and a modality offered both would send the form we cannot analyse.
    accept_enhanced_ct: bool = False
    #: PS3.8 ARTIM/DIMSE/network timeouts of the SCP, seconds.
    network_timeout_seconds: float = 60.0
    maximum_pdu_size: int = 0
    #: Spooled instances and results of finished series are deleted after this many hours (0 = never).
    retention_hours: float = 0.0
    #: SQLite journal of the job database: WAL (default), or DELETE where WAL is unsupported (NFS).
    db_journal_mode: Literal["WAL", "DELETE"] = "WAL"

    def check(self) -> list[Problem]:
        p = _check_ae("node.ae_title", self.ae_title) + _check_port("node.port", self.port, allow_zero=True)
        for i, aet in enumerate(self.allowed_calling_aets):
            p += _check_ae(f"node.allowed_calling_aets[{i}]", aet)
        if self.series_quiet_seconds <= 0:
            p.append(("node.series_quiet_seconds", self.series_quiet_seconds, "must be > 0"))
        if not 1 <= self.workers <= 64:
            p.append(("node.workers", self.workers, "must be between 1 and 64"))
        if not 1 <= self.max_associations <= 1000:
            p.append(("node.max_associations", self.max_associations, "must be between 1 and 1000"))
        if self.min_free_disk_mb < 0:
            p.append(("node.min_free_disk_mb", self.min_free_disk_mb, "must be >= 0"))
        if self.network_timeout_seconds <= 0:
            p.append(("node.network_timeout_seconds", self.network_timeout_seconds, "must be > 0"))
        if self.maximum_pdu_size != 0 and not 4096 <= self.maximum_pdu_size <= 2**32 - 1:
            p.append(("node.maximum_pdu_size", self.maximum_pdu_size, "must be 0 (unlimited) or >= 4096"))
        if self.retention_hours < 0:
            p.append(("node.retention_hours", self.retention_hours, "must be >= 0"))
        return p


@dataclass
class HttpConfig:
    """The node's HTTP endpoint: ``GET /health``, ``GET /jobs`` and STOW-RS ``POST /dicom-web/studies``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8081
    #: Largest accepted STOW-RS request body.
    max_request_mb: int = 2048

    def check(self) -> list[Problem]:
        p = _check_port("http.port", self.port, allow_zero=True)
        if self.max_request_mb < 1:
            p.append(("http.max_request_mb", self.max_request_mb, "must be >= 1"))
        return p


@dataclass
class SelectionConfig:
    """Series selection rules (maps onto :class:`~lungburden.dicom_io.selection.SelectionRules`
    and the loader's :class:`~lungburden.dicom_io.volume.LoadLimits`)."""

    modalities: list[str] = field(default_factory=lambda: list(_RULES.modalities))
    required_image_type: list[str] = field(default_factory=lambda: list(_RULES.required_image_type))
    excluded_image_type: list[str] = field(default_factory=lambda: list(_RULES.excluded_image_type))
    min_slices: int = _RULES.min_slices
    slice_thickness_mm: tuple[float, float] = _RULES.slice_thickness_mm
    kernel_regex: str | None = _RULES.kernel_regex
    description_regex: str | None = _RULES.description_regex
    excluded_description_regex: str | None = _RULES.excluded_description_regex
    #: BodyPartExamined naming the chest: ranks candidates, never refuses one (the images decide).
    body_part_regex: str | None = _RULES.body_part_regex
    #: Which kernels count as lung kernels for the preference; null = the pipeline's built-in list.
    lung_kernel_regex: str | None = None
    #: Among accepted reconstructions of one acquisition, analyse only the preferred one
    #: (lung kernel, then thinner, then more slices); false = analyse every accepted series.
    prefer_one_reconstruction: bool = True
    spacing_tolerance: float = _LIMITS.spacing_tolerance
    max_tilt_degrees: float = _LIMITS.max_tilt_degrees

    def check(self) -> list[Problem]:
        p: list[Problem] = []
        if self.min_slices < 1:
            p.append(("selection.min_slices", self.min_slices, "must be >= 1"))
        low, high = self.slice_thickness_mm
        if not 0 <= low <= high:
            p.append(
                ("selection.slice_thickness_mm", list(self.slice_thickness_mm), "must be [min, max], 0 <= min <= max")
            )
        for key in ("kernel_regex", "description_regex", "excluded_description_regex", "body_part_regex",
                    "lung_kernel_regex"):
            p += _check_regex(f"selection.{key}", getattr(self, key))
        if not 0 < self.spacing_tolerance < 1:
            p.append(("selection.spacing_tolerance", self.spacing_tolerance, "must be between 0 and 1"))
        if self.max_tilt_degrees < 0:
            p.append(("selection.max_tilt_degrees", self.max_tilt_degrees, "must be >= 0"))
        return p

    def to_rules(self) -> SelectionRules:
        return SelectionRules(
            modalities=tuple(self.modalities),
            required_image_type=tuple(self.required_image_type),
            excluded_image_type=tuple(self.excluded_image_type),
            min_slices=self.min_slices,
            slice_thickness_mm=tuple(self.slice_thickness_mm),
            kernel_regex=self.kernel_regex,
            description_regex=self.description_regex,
            excluded_description_regex=self.excluded_description_regex,
            body_part_regex=self.body_part_regex,
            lung_kernel_regex=self.lung_kernel_regex or _RULES.lung_kernel_regex,
        )

    def to_limits(self) -> LoadLimits:
        return LoadLimits(
            min_slices=self.min_slices,
            spacing_tolerance=self.spacing_tolerance,
            max_tilt_degrees=self.max_tilt_degrees,
            body_part_regex=self.body_part_regex,
        )


@dataclass
class ProcessingConfig:
    """How a selected series is analysed."""

    #: Segmenter name (see ``lungburden models``); null = the shipped default.
    model: str | None = None
    #: Network weights file (a checkpoint of ``lungburden model train``, e.g. site-tuned weights);
    #: null = the weights shipped with the package. Its name and SHA-256 are recorded in the outputs.
    weights: Path | None = None
    #: What happens when instances of a series arrive after its processing started (docs/node.md).
    late_instance_policy: Literal["reprocess", "ignore"] = "reprocess"
    #: Seconds without a heartbeat after which a running job of a vanished worker is re-queued.
    job_lease_seconds: float = 120.0

    def check(self) -> list[Problem]:
        p: list[Problem] = []
        if self.job_lease_seconds < 5:
            p.append(("processing.job_lease_seconds", self.job_lease_seconds, "must be >= 5"))
        if self.weights is not None and not Path(self.weights).is_file():
            p.append(("processing.weights", str(self.weights), "is not a readable file"))
        return p


@dataclass
class ExportConfig:
    """Retries of deliveries to the destinations (exponential backoff, then dead-letter)."""

    #: Failed attempts after which a delivery goes to the dead-letter state (``lungburden retry``).
    max_attempts: int = 8
    backoff_initial_seconds: float = 5.0
    backoff_factor: float = 2.0
    backoff_max_seconds: float = 600.0
    timeout_seconds: float = 60.0

    def check(self) -> list[Problem]:
        p: list[Problem] = []
        if self.max_attempts < 1:
            p.append(("export.max_attempts", self.max_attempts, "must be >= 1"))
        if self.backoff_initial_seconds < 0:
            p.append(("export.backoff_initial_seconds", self.backoff_initial_seconds, "must be >= 0"))
        if self.backoff_factor < 1:
            p.append(("export.backoff_factor", self.backoff_factor, "must be >= 1"))
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            p.append(("export.backoff_max_seconds", self.backoff_max_seconds, "must be >= backoff_initial_seconds"))
        if self.timeout_seconds <= 0:
            p.append(("export.timeout_seconds", self.timeout_seconds, "must be > 0"))
        return p


@dataclass
class DimseDestination:
    """A DICOM peer receiving the results by C-STORE (PS3.4 B)."""

    TYPE: ClassVar[str] = "dimse"
    name: str
    host: str
    port: int
    ae_title: str
    #: Our calling AE title; null = node.ae_title.
    calling_ae_title: str | None = None
    type: str = "dimse"

    def check(self, key: str) -> list[Problem]:
        p = _check_port(f"{key}.port", self.port) + _check_ae(f"{key}.ae_title", self.ae_title)
        if self.calling_ae_title is not None:
            p += _check_ae(f"{key}.calling_ae_title", self.calling_ae_title)
        return p


@dataclass
class DicomwebDestination:
    """A DICOMweb origin server receiving the results by STOW-RS (PS3.18 10.5)."""

    TYPE: ClassVar[str] = "dicomweb"
    name: str
    #: Base URL of the DICOMweb service, e.g. http://pacs:8042/dicom-web
    url: str
    username: str | None = None
    password: str | None = None
    #: Extra HTTP headers (e.g. Authorization).
    headers: dict[str, str] = field(default_factory=dict)
    type: str = "dicomweb"

    def check(self, key: str) -> list[Problem]:
        if not re.match(r"^https?://[^/\s]+", self.url):
            return [(f"{key}.url", self.url, "must be an http:// or https:// URL")]
        if (self.username is None) != (self.password is None):
            return [(f"{key}.username", self.username, "username and password go together")]
        return []


@dataclass
class FolderDestination:
    """A local folder receiving ``<study>/<series>/{seg.dcm,sr.dcm,result.json}``."""

    TYPE: ClassVar[str] = "folder"
    name: str
    path: Path
    type: str = "folder"

    def check(self, key: str) -> list[Problem]:
        return []


Destination = DimseDestination | DicomwebDestination | FolderDestination
DESTINATION_TYPES: dict[str, type] = {c.TYPE: c for c in (DimseDestination, DicomwebDestination, FolderDestination)}


@dataclass
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Log file (appended); null = standard error only.
    file: Path | None = None

    def check(self) -> list[Problem]:
        return []


@dataclass
class Config:
    """The whole configuration (one YAML file)."""

    node: NodeConfig = field(default_factory=NodeConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    destinations: list[Destination] = field(default_factory=list)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: Where the configuration came from (not a YAML key).
    source: str = field(default="<defaults>", compare=False)

    SECTIONS: ClassVar[tuple[str, ...]] = (
        "node", "http", "selection", "processing", "export", "destinations", "logging",
    )

    def check(self) -> list[Problem]:
        p: list[Problem] = []
        for name in ("node", "http", "selection", "processing", "export", "logging"):
            p += getattr(self, name).check()
        seen: set[str] = set()
        for i, dest in enumerate(self.destinations):
            key = f"destinations[{i}]"
            if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", dest.name):
                p.append((f"{key}.name", dest.name, "must be 1-64 characters of A-Z a-z 0-9 _ . -"))
            if dest.name in seen:
                p.append((f"{key}.name", dest.name, "duplicate destination name"))
            seen.add(dest.name)
            p += dest.check(key)
        return p

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    @property
    def storage_dir(self) -> Path:
        return Path(self.node.storage_dir)
