"""The ``"LungBurden"`` section of Orthanc's configuration, as read by the worker process.

The section holds two kinds of keys:

- plugin keys in Orthanc's CamelCase style (:data:`PLUGIN_KEYS`): ``Enabled``, ``Python``,
  ``PythonPath``, ``WorkDir``, ``OrthancUrl``, ``ForwardToModalities``,
  ``ForwardToDicomWebServers``, ``ReplacePrevious``;
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
}
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


def parse_section(
    section: Mapping,
    work_dir: Path,
    orthanc_url: str,
    orthanc_aet: str = "ORTHANC",
    authorization: str | None = None,
    orthanc_pid: int | None = None,
    source: str = "Orthanc configuration, section LungBurden",
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
    if problems:
        raise ConfigError(problems, source)
    config = config_from_mapping(yaml_part, source, base_dir=work_dir)
    return PluginSettings(
        work_dir=work_dir,
        orthanc_url=str(section.get("OrthancUrl") or orthanc_url).rstrip("/"),
        config=config,
        authorization=authorization,
        orthanc_pid=orthanc_pid,
        forward_modalities=tuple(section.get("ForwardToModalities") or ()),
        forward_dicomweb_servers=tuple(section.get("ForwardToDicomWebServers") or ()),
        replace_previous=bool(section.get("ReplacePrevious", True)),
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
    )
