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


def _check_files(key: str, config: object, names: tuple[str, ...]) -> list[Problem]:
    """A problem for each of ``names`` on ``config`` that is set but names no file."""
    problems: list[Problem] = []
    for name in names:
        value = getattr(config, name)
        if value is not None and not Path(value).is_file():
            problems.append((f"{key}.{name}", str(value), "file not found"))
    return problems


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
class TlsClientCertificate:
    """A client certificate (by its subject Common Name) and the calling AE titles it may use."""

    common_name: str
    ae_titles: list[str] = field(default_factory=list)


@dataclass
class NodeTlsConfig:
    """DICOM TLS of the SCP (PS3.15 B.1, BCP 195): TLS 1.2+, client certificates verified."""

    #: PEM certificate (chain) and private key of the node.
    certificate: Path
    private_key: Path
    #: PEM CA certificates that sign the clients' certificates; null = no client certificates.
    ca_certificates: Path | None = None
    require_client_certificate: bool = True
    #: When not empty, only these client certificates are accepted, each for its AE titles.
    client_ae_by_certificate: list[TlsClientCertificate] = field(default_factory=list)
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    def check(self, key: str) -> list[Problem]:
        p = _check_files(key, self, ("certificate", "private_key", "ca_certificates"))
        if self.require_client_certificate and self.ca_certificates is None:
            p.append((f"{key}.ca_certificates", None, "is required when require_client_certificate is true"))
        if self.client_ae_by_certificate and self.ca_certificates is None:
            p.append((f"{key}.ca_certificates", None, "is required by client_ae_by_certificate"))
        for i, m in enumerate(self.client_ae_by_certificate):
            for j, aet in enumerate(m.ae_titles):
                p += _check_ae(f"{key}.client_ae_by_certificate[{i}].ae_titles[{j}]", aet)
        return p


@dataclass
class DestinationTlsConfig:
    """DICOM TLS to a C-STORE destination (PS3.15 B.1, BCP 195)."""

    #: PEM CA certificates to verify the peer with; null = the system's trust store.
    ca_certificates: Path | None = None
    #: Our client certificate and key (PEM), for peers that require one.
    certificate: Path | None = None
    private_key: Path | None = None
    #: Name checked against the peer's certificate; null = the destination's host.
    server_name: str | None = None
    verify_server_name: bool = True
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    def check(self, key: str) -> list[Problem]:
        p = _check_files(key, self, ("ca_certificates", "certificate", "private_key"))
        if (self.certificate is None) != (self.private_key is None):
            p.append((f"{key}.certificate", str(self.certificate), "certificate and private_key go together"))
        return p


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
    #: Simultaneous established associations; further requests are rejected (transient).
    max_associations: int = 8
    #: Connections still negotiating (TLS handshake, A-ASSOCIATE-RQ); more are closed at once.
    max_pending_connections: int = 32
    #: C-STORE is refused with 0xA700 (Out of Resources) below this much free space in storage_dir.
    min_free_disk_mb: int = 1024
    #: Also negotiate Enhanced CT Image Storage (multi-frame). Off by default: the pipeline analyses
    #: CT Image Storage only, and a modality offered both would send the form we cannot analyse.
    accept_enhanced_ct: bool = False
    #: Idle timeout of an association and DIMSE response timeout (PS3.8 / PS3.7), seconds.
    network_timeout_seconds: float = 60.0
    #: A new connection must complete TLS and send its A-ASSOCIATE-RQ within this (PS3.8 ARTIM).
    acse_timeout_seconds: float = 10.0
    #: Maximum Length of received P-DATA-TF PDUs advertised (PS3.8 D.3.3.1) and enforced;
    #: 0 = none advertised (64 MiB enforced).
    maximum_pdu_size: int = 1048576
    #: Spooled instances and results of finished series are deleted after this many hours (0 = never).
    retention_hours: float = 0.0
    #: SQLite journal of the job database: WAL (default), or DELETE where WAL is unsupported (NFS).
    db_journal_mode: Literal["WAL", "DELETE"] = "WAL"
    #: DICOM TLS on ``port``; null = plain TCP.
    tls: NodeTlsConfig | None = None

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
        if self.maximum_pdu_size != 0 and not 4096 <= self.maximum_pdu_size <= 64 * 2**20:
            p.append(("node.maximum_pdu_size", self.maximum_pdu_size, "must be 0 (unlimited) or 4096-67108864"))
        if not 1 <= self.max_pending_connections <= 10000:
            p.append(("node.max_pending_connections", self.max_pending_connections, "must be between 1 and 10000"))
        if not 0 < self.acse_timeout_seconds <= 300:
            p.append(("node.acse_timeout_seconds", self.acse_timeout_seconds, "must be > 0 and <= 300"))
        if self.tls is not None:
            p += self.tls.check("node.tls")
        if self.retention_hours < 0:
            p.append(("node.retention_hours", self.retention_hours, "must be >= 0"))
        return p


@dataclass
class HttpTlsConfig:
    """HTTPS on the endpoint (BCP 195): TLS 1.2 or later; with ``ca_certificates``, client
    certificates signed by that CA are required as well."""

    #: PEM certificate (chain) and private key of the endpoint.
    certificate: Path
    private_key: Path
    #: PEM CA certificates; set = every client must present a certificate they sign.
    ca_certificates: Path | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    def check(self, key: str) -> list[Problem]:
        return _check_files(key, self, ("certificate", "private_key", "ca_certificates"))


@dataclass
class HttpToken:
    """A bearer token (``Authorization: Bearer <token>``) of one named client."""

    name: str
    #: Hex SHA-256 of the token (``printf %s "$TOKEN" | sha256sum``); the token itself is not stored.
    token_sha256: str | None = None
    #: Or a file holding the token (first line), readable by the node only.
    token_file: Path | None = None


@dataclass
class HttpUser:
    """A user of HTTP Basic authentication (over HTTPS only, in practice)."""

    name: str
    #: ``pbkdf2_sha256$<iterations>$<salt>$<hash>``, as printed by
    #: ``python -m lungburden.dicom_node.http hash-password``.
    password_hash: str


_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_PASSWORD_HASH = re.compile(r"^pbkdf2_sha256\$[0-9]{1,8}\$[A-Za-z0-9+/=_-]+\$[A-Za-z0-9+/=_-]+$")


@dataclass
class HttpAuthConfig:
    """Who may use STOW-RS and ``/jobs``: bearer tokens and Basic users, each with a name for the
    audit trail. Requests without credentials are served only on a loopback ``host``, or with
    ``allow_anonymous`` (e.g. behind an authenticating reverse proxy)."""

    tokens: list[HttpToken] = field(default_factory=list)
    users: list[HttpUser] = field(default_factory=list)
    allow_anonymous: bool = False

    def check(self, key: str) -> list[Problem]:
        p: list[Problem] = []
        names: set[str] = set()
        for i, t in enumerate(self.tokens):
            k = f"{key}.tokens[{i}]"
            if (t.token_sha256 is None) == (t.token_file is None):
                p.append((k, t.name, "needs exactly one of token_sha256 and token_file"))
            if t.token_sha256 is not None and not _SHA256_HEX.match(t.token_sha256):
                p.append((f"{k}.token_sha256", t.token_sha256, "must be 64 hexadecimal digits"))
            if t.token_file is not None and not Path(t.token_file).is_file():
                p.append((f"{k}.token_file", str(t.token_file), "file not found"))
            names.add(t.name)
        for i, u in enumerate(self.users):
            if not _PASSWORD_HASH.match(u.password_hash or ""):
                p.append((f"{key}.users[{i}].password_hash", "...",
                          "must be pbkdf2_sha256$<iterations>$<salt>$<hash> "
                          "(python -m lungburden.dicom_node.http hash-password)"))
            if not u.name or ":" in u.name:
                p.append((f"{key}.users[{i}].name", u.name, "must be non-empty without ':'"))
        return p


@dataclass
class HttpConfig:
    """The node's HTTP endpoint: ``GET /health``, ``GET /jobs`` and STOW-RS ``POST /dicom-web/studies``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8081
    #: Largest accepted STOW-RS request body.
    max_request_mb: int = 2048
    #: A request head must arrive, and a body read may stall, at most this long (RFC 9112 9.8).
    timeout_seconds: float = 30.0
    #: An idle kept-alive connection is closed after this long.
    keep_alive_seconds: float = 5.0
    #: Open connections beyond this are answered 503.
    max_connections: int = 100
    #: HTTPS; null = plain HTTP.
    tls: HttpTlsConfig | None = None
    auth: HttpAuthConfig = field(default_factory=HttpAuthConfig)

    def check(self) -> list[Problem]:
        p = _check_port("http.port", self.port, allow_zero=True)
        if self.max_request_mb < 1:
            p.append(("http.max_request_mb", self.max_request_mb, "must be >= 1"))
        if not 0 < self.timeout_seconds <= 3600:
            p.append(("http.timeout_seconds", self.timeout_seconds, "must be > 0 and <= 3600"))
        if not 0 < self.keep_alive_seconds <= 600:
            p.append(("http.keep_alive_seconds", self.keep_alive_seconds, "must be > 0 and <= 600"))
        if not 1 <= self.max_connections <= 10000:
            p.append(("http.max_connections", self.max_connections, "must be between 1 and 10000"))
        if self.tls is not None:
            p += self.tls.check("http.tls")
        p += self.auth.check("http.auth")
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
    #: Result objects produced and delivered: seg (DICOM SEG), sr (TID 1500 SR, needs seg),
    #: sc (Secondary Capture key images), pdf (Encapsulated PDF report; also report.pdf).
    outputs: list[str] = field(default_factory=lambda: ["seg", "sr", "sc", "pdf"])
    #: When the quality checks refuse a result (docs/hardening.md): ``none`` delivers nothing (the
    #: job fails with the reason), ``sr`` delivers a short SR without measurements that gives the
    #: reason (the job is done, its reason says why there are no numbers).
    on_quality_failure: Literal["none", "sr"] = "none"

    def check(self) -> list[Problem]:
        p: list[Problem] = []
        if self.job_lease_seconds < 5:
            p.append(("processing.job_lease_seconds", self.job_lease_seconds, "must be >= 5"))
        unknown = [o for o in self.outputs if o not in ("seg", "sr", "sc", "pdf")]
        if unknown or not self.outputs:
            p.append(("processing.outputs", self.outputs, "must be a non-empty list of seg, sr, sc, pdf"))
        elif "sr" in self.outputs and "seg" not in self.outputs:
            p.append(("processing.outputs", self.outputs, "sr needs seg (the SR references the SEG)"))
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
    #: DICOM TLS to the peer; null = plain TCP.
    tls: DestinationTlsConfig | None = None

    def check(self, key: str) -> list[Problem]:
        p = _check_port(f"{key}.port", self.port) + _check_ae(f"{key}.ae_title", self.ae_title)
        if self.calling_ae_title is not None:
            p += _check_ae(f"{key}.calling_ae_title", self.calling_ae_title)
        if self.tls is not None:
            p += self.tls.check(f"{key}.tls")
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
class MoveReceiver:
    """Where a C-MOVE sends the priors: the AE title the PACS knows for lungburden as a move
    destination (with this host's address and ``port``), served by a Storage SCP lungburden runs
    on ``host``:``port`` for the time of a prior search."""

    ae_title: str
    port: int
    host: str = "0.0.0.0"

    def check(self, key: str) -> list[Problem]:
        return _check_ae(f"{key}.ae_title", self.ae_title) + _check_port(f"{key}.port", self.port)


@dataclass
class FollowupConfig:
    """Comparison with the patient's prior chest CTs (README "Follow-up"), from one PACS: by
    DICOMweb at ``url`` (QIDO-RS search, WADO-RS retrieval, STOW-RS of an analysed prior's
    results) or by DIMSE at ``dimse`` (C-FIND, C-GET or C-MOVE, C-STORE; Study Root, PS3.4 C.4). Numbers
    come from a lungburden SR of the same model version, else the prior is analysed."""

    enabled: bool = False
    #: DICOMweb base URL of the PACS that holds the priors (e.g. http://pacs:8042/dicom-web).
    url: str | None = None
    #: Or the PACS as a DICOM peer (host, port, its AE title, our calling AE title, TLS) that
    #: answers Study Root C-FIND and C-GET and accepts C-STORE of the results.
    dimse: DimseDestination | None = None
    #: With ``dimse``: retrieve by C-MOVE to this receiver instead of by C-GET (for a PACS
    #: without C-GET); null = C-GET.
    move_to: MoveReceiver | None = None
    username: str | None = None
    password: str | None = None
    #: How far back priors are searched (days before the current study's date).
    lookback_days: int = 365
    #: At most this many priors, the most recent first.
    max_priors: int = 3
    #: Store the results of an analysed prior into the PACS (so it is read, not analysed, next time).
    store_results: bool = True
    timeout_seconds: float = 120.0

    def check(self) -> list[Problem]:
        p: list[Problem] = []
        if self.enabled and not self.url and self.dimse is None:
            p.append(("followup.url", self.url, "is needed when followup.enabled is true (or followup.dimse)"))
        if self.url and self.dimse is not None:
            p.append(("followup.dimse", self.dimse.name, "give one source of priors: followup.url or followup.dimse"))
        if self.dimse is not None:
            if not self.dimse.host.strip():
                p.append(("followup.dimse.host", self.dimse.host, "is needed (the PACS's host name or address)"))
            p += self.dimse.check("followup.dimse")
        if self.move_to is not None:
            if self.dimse is None:
                p.append(("followup.move_to", self.move_to.ae_title,
                          "needs a DIMSE source of priors (followup.dimse; C-MOVE is DIMSE)"))
            p += self.move_to.check("followup.move_to")
        if self.url and not re.match(r"^https?://", self.url):
            p.append(("followup.url", self.url, "must be an http:// or https:// DICOMweb base URL"))
        if self.lookback_days < 1:
            p.append(("followup.lookback_days", self.lookback_days, "must be >= 1"))
        if not 1 <= self.max_priors <= 20:
            p.append(("followup.max_priors", self.max_priors, "must lie in 1..20"))
        if self.timeout_seconds <= 0:
            p.append(("followup.timeout_seconds", self.timeout_seconds, "must be > 0"))
        return p


@dataclass
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Log file (appended); null = standard error only.
    file: Path | None = None
    #: Audit trail (JSON lines, appended): intake, job outcomes, deliveries; UIDs and peers, no
    #: patient data. Null = no audit trail.
    audit_file: Path | None = None

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
    followup: FollowupConfig = field(default_factory=FollowupConfig)
    #: Where the configuration came from (not a YAML key).
    source: str = field(default="<defaults>", compare=False)

    SECTIONS: ClassVar[tuple[str, ...]] = (
        "node", "http", "selection", "processing", "export", "destinations", "logging", "followup",
    )

    def check(self) -> list[Problem]:
        p: list[Problem] = []
        for name in ("node", "http", "selection", "processing", "export", "logging", "followup"):
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
