"""``lungburden orthanc-config``: print a complete Orthanc configuration that runs the plugin.

The output loads Orthanc's DICOMweb and Python plugins, points ``PythonScript`` at this
package's ``plugin.py`` and has a ``"LungBurden"`` section with every default spelled out,
including ``Python`` = the interpreter running this command (so the plugin's worker finds the
installed package). Users start from it; so do the integration tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: Where Debian/Ubuntu packages (orthanc-python, orthanc-dicomweb) and the orthancteam Docker
#: images install Orthanc's plugins.
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/local/share/orthanc/plugins"))
PYTHON_PLUGIN = "libOrthancPython.so"
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"


def plugin_script() -> Path:
    """The script Orthanc's Python plugin must load."""
    return Path(__file__).resolve().with_name("plugin.py")


def find_plugins_dir() -> Path:
    for d in PLUGIN_DIRS:
        if (d / PYTHON_PLUGIN).exists():
            return d
    return PLUGIN_DIRS[0]


def default_section(python: str, work_dir: str | None = None) -> dict:
    """The ``"LungBurden"`` section with every default (YAML sections as in the node's configuration)."""
    from lungburden.config.loader import dump_config
    from lungburden.config.schema import Config
    from lungburden.orthanc_plugin.settings import DEFAULT_RETENTION_HOURS

    plain = dump_config(Config())
    section: dict = {
        "Enabled": True,
        "Python": python,
        "ForwardToModalities": [],
        "ForwardToDicomWebServers": [],
        "ReplacePrevious": True,
    }
    if work_dir is not None:
        section["WorkDir"] = work_dir
    section["node"] = {"retention_hours": DEFAULT_RETENTION_HOURS, "db_journal_mode": plain["node"]["db_journal_mode"]}
    for name in ("selection", "processing", "export", "destinations", "logging"):
        section[name] = plain[name]
    return section


def orthanc_config(
    http_port: int = 8042,
    dicom_port: int = 4242,
    storage: str | Path = "/var/lib/orthanc/db",
    aet: str = "ORTHANC",
    python: str | None = None,
    plugins_dir: Path | None = None,
    stable_age: int = 10,
    remote_access: bool = False,
    users: dict[str, str] | None = None,
    name: str = "lungburden-orthanc",
) -> dict:
    """A complete Orthanc configuration (JSON-ready mapping) running the lungburden plugin."""
    storage = str(Path(storage).expanduser().absolute())
    plugins = plugins_dir or find_plugins_dir()
    return {
        "Name": name,
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": remote_access,
        "AuthenticationEnabled": remote_access or bool(users),
        "RegisteredUsers": dict(users or {}),
        "StableAge": stable_age,
        "DicomModalities": {},
        "Plugins": [str(plugins / DICOMWEB_PLUGIN), str(plugins / PYTHON_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {}},
        "PythonScript": str(plugin_script()),
        "PythonVerbose": False,
        "LungBurden": default_section(python or sys.executable, str(Path(storage) / "lungburden")),
    }


def cmd_orthanc_config(args: argparse.Namespace) -> int:
    """Print the configuration (JSON) on standard output."""
    config = orthanc_config(
        http_port=args.http_port, dicom_port=args.dicom_port, storage=args.storage, aet=args.aet,
        python=args.python, plugins_dir=Path(args.plugins_dir) if args.plugins_dir else None,
        stable_age=args.stable_age, remote_access=args.remote_access,
        users=dict(u.split(":", 1) for u in args.user),
    )
    if args.model is not None:
        config["LungBurden"]["processing"]["model"] = args.model
    json.dump(config, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _user(text: str) -> str:
    if ":" not in text or not text.split(":", 1)[0]:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:PASSWORD")
    return text


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``orthanc-config`` to the ``lungburden`` command line."""
    p = subparsers.add_parser(
        "orthanc-config",
        help="print an Orthanc configuration (JSON) that runs lungburden as an Orthanc Python plugin",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--http-port", type=int, default=8042, help="Orthanc's HTTP port (default 8042)")
    p.add_argument("--dicom-port", type=int, default=4242, help="Orthanc's DICOM port (default 4242)")
    p.add_argument("--storage", default="/var/lib/orthanc/db",
                   help="Orthanc's storage and index folder (default /var/lib/orthanc/db); "
                        "the plugin works in <storage>/lungburden")
    p.add_argument("--aet", default="ORTHANC", help="Orthanc's AE title (default ORTHANC)")
    p.add_argument("--python", default=None,
                   help=f"interpreter of the plugin's worker, with lungburden installed (default {sys.executable})")
    p.add_argument("--plugins-dir", default=None,
                   help="folder of libOrthancPython.so and libOrthancDicomWeb.so (default: found in "
                        + ", ".join(map(str, PLUGIN_DIRS)) + ")")
    p.add_argument("--stable-age", type=int, default=10,
                   help="seconds without a new instance before Orthanc calls a series stable (default 10)")
    p.add_argument("--model", default=None, help="segmenter (see `lungburden models`; default: the shipped one)")
    p.add_argument("--remote-access", action="store_true",
                   help="allow HTTP access from other hosts (enables authentication: add --user)")
    p.add_argument("--user", action="append", default=[], type=_user, metavar="NAME:PASSWORD",
                   help="an HTTP user (enables authentication; repeatable). Orthanc replaces ${VAR} by the "
                        "environment variable VAR, e.g. --user 'admin:${ORTHANC_PASSWORD}'")
    p.set_defaults(func=cmd_orthanc_config)
