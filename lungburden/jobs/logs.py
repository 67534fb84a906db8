"""Logging set-up shared by the node's commands (``serve``, ``pull``) and the Orthanc plugin's worker."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from lungburden.config.schema import Config

#: The node's log lines (standard error and ``logging.file``).
NODE_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def configure_logging(
    config: Config,
    verbose: bool = False,
    stream_format: str = NODE_FORMAT,
    file_format: str | None = None,
    replace_handlers: bool = False,
    quiet: Iterable[str] = ("pynetdicom",),
) -> None:
    """Apply ``logging.level`` / ``logging.file``; the chatter of the ``quiet`` libraries (pynetdicom
    logs every PDU) stays at WARNING unless ``verbose`` (everything at DEBUG).

    Standard error gets ``stream_format`` (a handler is added only if the root logger has none, or
    replaces them with ``replace_handlers``); the log file gets ``file_format`` (default: the same).
    """
    root = logging.getLogger()
    if replace_handlers:
        root.handlers.clear()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(stream_format))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else getattr(logging, config.logging.level))
    if config.logging.file is not None:
        Path(config.logging.file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(config.logging.file)
        file_handler.setFormatter(logging.Formatter(file_format or stream_format))
        root.addHandler(file_handler)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


# --- audit trail -----------------------------------------------------------------------------------

#: Keys an audit record may never carry (patient identity and free text), whatever a caller passes.
_FORBIDDEN = frozenset({"patient_name", "patient_id", "patient_birth_date", "PatientName", "PatientID",
                        "PatientBirthDate", "description", "series_description", "study_description"})


class AuditLog:
    """Structured JSON-lines audit trail (``logging.audit_file``): who sent what, where results went.

    One line per event: ``time`` (UTC, ISO 8601), ``event`` and UIDs, AE titles, addresses,
    destinations and outcomes; never patient name, ID, birth date or free-text descriptions. Each
    line is one ``O_APPEND`` write, so the node's processes can share the file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: object) -> None:
        import json
        import os
        from datetime import UTC, datetime

        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event}
        record.update({k: v for k, v in fields.items() if k not in _FORBIDDEN and v is not None})
        line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


_AUDIT: AuditLog | None = None


def configure_audit(config: Config) -> AuditLog | None:
    """Open ``logging.audit_file`` for :func:`audit` in this process (``None``: audit off)."""
    global _AUDIT
    path = config.logging.audit_file
    _AUDIT = AuditLog(path) if path is not None else None
    return _AUDIT


def audit(event: str, source: str | None = None, **fields: object) -> None:
    """Append one audit record (no-op unless :func:`configure_audit` set a file); never raises.

    ``source``: the intake's ``channel:peer`` (``dimse:<calling AE>``, ``stow:<client address>``,
    ``stow:<client name>@<client address>``), recorded as ``channel``, ``calling_ae_title`` or
    ``host``, and ``user`` (the authenticated HTTP client).
    """
    if _AUDIT is None:
        return
    if source:
        channel, _, peer = source.partition(":")
        fields["channel"] = channel
        if channel == "stow" and "@" in peer:
            fields["user"], _, peer = peer.rpartition("@")
        fields["calling_ae_title" if channel == "dimse" else "host"] = peer
    try:
        _AUDIT.write(event, **fields)
    except Exception:  # noqa: BLE001 - auditing must never stop the intake or a delivery
        logging.getLogger(__name__).exception("cannot write the audit record %s", event)
