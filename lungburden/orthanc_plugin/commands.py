"""``lungburden orthanc-config``: print a complete Orthanc configuration that runs the plugin.

The output loads Orthanc's DICOMweb and Python plugins, points ``PythonScript`` at this
package's ``plugin.py`` and has a ``"LungBurden"`` section with every default spelled out,
including ``Python`` = the interpreter running this command (so the plugin's worker finds the
installed package). Users start from it; so do the integration tests.

Orthanc's REST API (and with it the plugin's ``/lungburden/...`` routes) always requires HTTP
Basic credentials (``AuthenticationEnabled``). Without ``--user``, one user ``lungburden`` with a
random password is generated: the password is printed once on standard error or, with
``--credentials-file``, written to that file (mode 0600). ``--output`` writes the configuration,
which holds the passwords, with mode 0600 too.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
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


#: The user generated when ``orthanc-config`` gets no ``--user``.
GENERATED_USER = "lungburden"


def generate_password() -> str:
    """A random password for Orthanc's ``RegisteredUsers`` (192 bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new or truncated file readable by its owner only (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


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
        "Engine": "local",
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
    """A complete Orthanc configuration (JSON-ready mapping) running the lungburden plugin.

    Authentication is always on: ``users`` (name -> password), or one generated user
    :data:`GENERATED_USER`.
    """
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
        "AuthenticationEnabled": True,
        "RegisteredUsers": dict(users) if users else {GENERATED_USER: generate_password()},
        "StableAge": stable_age,
        "DicomModalities": {},
        "Plugins": [str(plugins / DICOMWEB_PLUGIN), str(plugins / PYTHON_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {}},
        "PythonScript": str(plugin_script()),
        "PythonVerbose": False,
        "LungBurden": default_section(python or sys.executable, str(Path(storage) / "lungburden")),
    }


def cmd_orthanc_config(args: argparse.Namespace) -> int:
    """Print the configuration (JSON) on standard output, or write it to ``--output`` (mode 0600)."""
    users = dict(u.split(":", 1) for u in args.user)
    config = orthanc_config(
        http_port=args.http_port, dicom_port=args.dicom_port, storage=args.storage, aet=args.aet,
        python=args.python, plugins_dir=Path(args.plugins_dir) if args.plugins_dir else None,
        stable_age=args.stable_age, remote_access=args.remote_access, users=users,
    )
    if args.model is not None:
        config["LungBurden"]["processing"]["model"] = args.model
    text = json.dumps(config, indent=2) + "\n"
    if args.output:
        write_private(Path(args.output), text)
    else:
        sys.stdout.write(text)
    if not users:
        password = config["RegisteredUsers"][GENERATED_USER]
        if args.credentials_file:
            write_private(Path(args.credentials_file), f"{GENERATED_USER}:{password}\n")
            print(f"Orthanc REST API user {GENERATED_USER!r}: password written to {args.credentials_file}",
                  file=sys.stderr)
        else:
            print(f"Orthanc REST API user {GENERATED_USER!r}, password {password} "
                  "(shown once; also in RegisteredUsers of the configuration)", file=sys.stderr)
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
                   help="allow HTTP access from other hosts (RemoteAccessAllowed; default: this host only). "
                        "Credentials are required either way; put Orthanc behind TLS (SslEnabled) first")
    p.add_argument("--user", action="append", default=[], type=_user, metavar="NAME:PASSWORD",
                   help="an HTTP user (repeatable; default: user lungburden with a generated password). Orthanc "
                        "replaces ${VAR} by the environment variable VAR, e.g. --user 'admin:${ORTHANC_PASSWORD}'")
    p.add_argument("--credentials-file", default=None, metavar="PATH",
                   help="write the generated user's NAME:PASSWORD to PATH (mode 0600) instead of printing it")
    p.add_argument("--output", "-o", default=None, metavar="PATH",
                   help="write the configuration to PATH (mode 0600: it holds the passwords) instead of stdout")
    p.set_defaults(func=cmd_orthanc_config)
