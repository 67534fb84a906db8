"""The ``"LungBurden"`` section of Orthanc's configuration, as read by the worker process.

The section holds two kinds of keys:

- plugin keys in Orthanc's CamelCase style (:data:`PLUGIN_KEYS`): ``Enabled``, ``Python``,
  ``PythonPath``, ``WorkDir``, ``OrthancUrl``, ``ForwardToModalities``,
  ``ForwardToDicomWebServers``, ``ReplacePrevious``, ``Weights`` and the engine keys
  ``Engine`` (``local``: the worker analyses; ``celery``: ``lungburden worker`` processes do,
  :mod:`.celery_engine`), ``Broker``, ``ResultBackend``, ``Queue``, ``DicomWebUrl``;
- the node's YAML sections with the same keys and meaning, written as JSON: ``selection``,
  ``processing``, ``export``, ``destinations``, ``logging`` and, of ``node``, ``ae_title``
  (calling AE title of ``dimse`` destinations; default Orthanc's ``DicomAet``),
  ``retention_hours`` (spooled copies of analysed series are deleted after this many hours;
  default 24 in plugin mode) and ``db_journal_mode``. The ``http`` section does not apply.

The plugin script (``plugin.py``) copies the section into ``<WorkDir>/plugin-config.json`` with
the URL of Orthanc's REST API, and passes a REST API token in the environment
(``LUNGBURDEN_ORTHANC_AUTHORIZATION``); :func:`load_settings` validates everything at once.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lungburden.config.loader import ConfigError, config_from_mapping
from lungburden.config.schema import Config

SETTINGS_FILE = "plugin-config.json"
AUTH_ENV = "LUNGBURDEN_ORTHANC_AUTHORIZATION"

#: Plugin keys and their JSON types (``list`` = list of strings).
PLUGIN_KEYS: dict[str, tuple[type, ...]] = {
    "Enabled": (bool,),
    "Python": (str,),
    "PythonPath": (str, list),
    "WorkDir": (str,),
    "OrthancUrl": (str,),
    "ForwardToModalities": (list,),
    "ForwardToDicomWebServers": (list,),
    "ReplacePrevious": (bool,),
    "Weights": (str,),
    "Engine": (str,),
    "Broker": (str,),
    "ResultBackend": (str,),
    "Queue": (str,),
    "DicomWebUrl": (str,),
}
ENGINES = ("local", "celery")
#: URL schemes of the Celery brokers (kombu transports) accepted in ``Broker``.
BROKER_SCHEMES = ("redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp")
#: Settings that ``Engine: celery`` does not honour (no result files here, no follow-up settings
#: sent to the workers, no refusal SR from the archive task): key path -> (the only value allowed, why).
CELERY_UNSUPPORTED: dict[str, tuple[object, str]] = {
    "destinations": ([], "the result files stay on the Celery workers; forward with ForwardToModalities / "
                         "ForwardToDicomWebServers"),
    "followup.enabled": (False, "the plugin sends the Celery workers no follow-up settings"),
    "processing.on_quality_failure": ("none", "the Celery workers run the archive task, which fails a "
                                              "refused series"),
}
DEFAULT_DICOMWEB_ROOT = "/dicom-web/"
#: Node YAML sections accepted inside the section.
YAML_SECTIONS = ("node", "selection", "processing", "export", "destinations", "logging", "followup")
#: Keys of the YAML ``node`` section that apply in plugin mode.
NODE_KEYS = ("ae_title", "retention_hours", "db_journal_mode")
DEFAULT_RETENTION_HOURS = 24.0


@dataclass(frozen=True)
class PluginSettings:
    """Everything the worker needs: where Orthanc is, what to forward, and the node configuration."""

    work_dir: Path
    orthanc_url: str
    config: Config
    authorization: str | None = None
    orthanc_pid: int | None = None
    forward_modalities: tuple[str, ...] = ()
    forward_dicomweb_servers: tuple[str, ...] = ()
    replace_previous: bool = True
    #: ``local`` (the worker runs the pipeline) or ``celery`` (archive workers do).
    engine: str = "local"
    broker: str | None = None
    #: Celery result backend (None: the broker).
    result_backend: str | None = None
    #: Celery queue (None: the archive workers' default queue).
    queue: str | None = None
    #: Orthanc's DICOMweb base URL as the Celery workers reach it (WADO-RS in, STOW-RS out).
    dicomweb_url: str = ""


def _engine_problems(section: Mapping, yaml_part: Mapping) -> list[tuple[str, object, str]]:
    """The errors of ``Engine`` and of the keys that go with it."""
    engine = section.get("Engine", "local")
    if not isinstance(engine, str):
        return []  # reported as a type error
    if engine not in ENGINES:
        return [("LungBurden.Engine", engine, f"must be one of {', '.join(ENGINES)}")]
    problems: list[tuple[str, object, str]] = []
    for key, schemes in (("Broker", BROKER_SCHEMES), ("ResultBackend", None), ("DicomWebUrl", ("http", "https"))):
        value = section.get(key)
        if not isinstance(value, str):
            continue
        parts = urlsplit(value)
        if not parts.netloc or (schemes is not None and parts.scheme not in schemes):
            kinds = ", ".join(f"{s}://" for s in schemes) if schemes else "scheme://host"
            problems.append((f"LungBurden.{key}", value, f"must be a URL ({kinds})"))
    if section.get("Queue") == "":
        problems.append(("LungBurden.Queue", "", "must not be empty"))
    if engine != "celery":
        return problems
    if not section.get("Broker"):
        problems.append(("LungBurden.Broker", section.get("Broker"),
                         "is required with Engine celery (e.g. redis://broker:6379/0)"))
    for path, (allowed, why) in CELERY_UNSUPPORTED.items():
        value: object = yaml_part
        for part in path.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None and value != allowed:
            problems.append((f"LungBurden.{path}", value, f"does not apply with Engine celery ({why})"))
    return problems


def parse_section(
    section: Mapping,
    work_dir: Path,
    orthanc_url: str,
    orthanc_aet: str = "ORTHANC",
    authorization: str | None = None,
    orthanc_pid: int | None = None,
    source: str = "Orthanc configuration, section LungBurden",
    dicomweb_root: str = DEFAULT_DICOMWEB_ROOT,
) -> PluginSettings:
    """Validate a ``"LungBurden"`` section; raises :class:`ConfigError` naming every bad key."""
    if not isinstance(section, Mapping):
        raise ConfigError([("LungBurden", section, "must be a JSON object")], source)
    work_dir = Path(work_dir).absolute()  # the job engine's storage folder
    problems: list[tuple[str, object, str]] = []
    yaml_part: dict = {}
    for key, value in section.items():
        key = str(key)
        if key in PLUGIN_KEYS:
            types = PLUGIN_KEYS[key]
            if not isinstance(value, types) or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
                kind = " or ".join("a list of strings" if t is list else t.__name__ for t in types)
                problems.append((f"LungBurden.{key}", value, f"must be {kind}"))
        elif key in YAML_SECTIONS:
            yaml_part[key] = value
        elif key == "http":
            problems.append(("LungBurden.http", value, "does not apply to the Orthanc plugin (Orthanc serves HTTP)"))
        else:
            close = difflib.get_close_matches(key, [*PLUGIN_KEYS, *YAML_SECTIONS], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((f"LungBurden.{key}", value, f"unknown key{hint}"))
    node = yaml_part.get("node")
    if node is not None:
        if isinstance(node, Mapping):
            for k in node:
                if k not in NODE_KEYS:
                    problems.append((f"LungBurden.node.{k}", node[k],
                                     f"does not apply to the Orthanc plugin (only {', '.join(NODE_KEYS)})"))
        node = dict(node) if isinstance(node, Mapping) else node
    else:
        node = {}
    if isinstance(node, dict):
        node.setdefault("ae_title", orthanc_aet)
        node.setdefault("retention_hours", DEFAULT_RETENTION_HOURS)
        node["storage_dir"] = str(work_dir)
    yaml_part["node"] = node
    if "Weights" in section:  # shorthand of "processing": {"weights": ...}
        processing = yaml_part.setdefault("processing", {})
        if isinstance(processing, Mapping):
            yaml_part["processing"] = {**processing, "weights": section["Weights"]}
    problems += _engine_problems(section, yaml_part)
    if problems:
        raise ConfigError(problems, source)
    config = config_from_mapping(yaml_part, source, base_dir=work_dir)
    orthanc_url = str(section.get("OrthancUrl") or orthanc_url).rstrip("/")
    return PluginSettings(
        work_dir=work_dir,
        orthanc_url=orthanc_url,
        config=config,
        authorization=authorization,
        orthanc_pid=orthanc_pid,
        forward_modalities=tuple(section.get("ForwardToModalities") or ()),
        forward_dicomweb_servers=tuple(section.get("ForwardToDicomWebServers") or ()),
        replace_previous=bool(section.get("ReplacePrevious", True)),
        engine=str(section.get("Engine", "local")),
        broker=section.get("Broker") or None,
        result_backend=section.get("ResultBackend") or None,
        queue=section.get("Queue") or None,
        dicomweb_url=str(section.get("DicomWebUrl") or orthanc_url + "/" + dicomweb_root.strip("/")).rstrip("/"),
    )


def load_settings(work_dir: Path, environ: Mapping[str, str] | None = None) -> PluginSettings:
    """Read ``<work_dir>/plugin-config.json`` (written by the plugin script) and validate it."""
    environ = os.environ if environ is None else environ
    path = Path(work_dir) / SETTINGS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError([("<file>", str(path), f"cannot be read ({exc})")], str(path)) from exc
    return parse_section(
        raw.get("lungburden") or {},
        Path(work_dir).absolute(),
        str(raw.get("orthanc_url") or "http://127.0.0.1:8042"),
        orthanc_aet=str(raw.get("orthanc_aet") or "ORTHANC"),
        authorization=environ.get(AUTH_ENV) or None,
        orthanc_pid=raw.get("orthanc_pid"),
        dicomweb_root=str(raw.get("dicomweb_root") or DEFAULT_DICOMWEB_ROOT),
    )
