"""A real Orthanc (Debian package) for integration tests: own JSON config, free ports, temp storage.

Usage::

    with OrthancServer(tmp_path / "orthanc") as orthanc:      # DICOMweb plugin loaded by default
        orthanc.dicom_port, orthanc.url, orthanc.dicomweb_url
        orthanc.get("/instances"); orthanc.upload(path); orthanc.stop(); orthanc.start()

Options: ``plugins`` (extra plugin paths, e.g. the Python plugin), ``extra_config`` (merged into
the JSON configuration, e.g. ``{"Python": {"Path": ...}}``, ``{"DicomModalities": {...}}``),
``aet``, ``stable_age``. REST calls use the first of ``RegisteredUsers`` when the configuration
has ``AuthenticationEnabled`` (see :attr:`OrthancServer.auth`). Nothing listens beyond 127.0.0.1
(``RemoteAccessAllowed`` off, DICOM bound via ``DicomServerEnabled`` on a free port, HTTP on a free port).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import requests
from processes import ManagedProcess, free_port

ORTHANC_BINARY = "/usr/sbin/Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
PYTHON_PLUGIN = "libOrthancPython.so"


def find_plugin(name: str) -> str | None:
    """Path of an Orthanc plugin shared library shipped by a Debian package (``dpkg -L orthanc-*``)."""
    for directory in PLUGIN_DIRS:
        path = Path(directory) / name
        if path.exists():
            return str(path)
        matches = sorted(Path(directory).glob(name + "*")) if Path(directory).is_dir() else []
        if matches:
            return str(matches[0])
    return None


def orthanc_available() -> bool:
    return Path(ORTHANC_BINARY).exists() and find_plugin(DICOMWEB_PLUGIN) is not None


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


class OrthancServer(ManagedProcess):
    """One Orthanc process with its own configuration and storage under ``workdir``."""

    name = "Orthanc"
    stop_timeout = 15.0

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        plugins: Iterable[str] = (),
        dicomweb: bool = True,
        extra_config: dict | None = None,
        stable_age: int = 1,
        http_port: int | None = None,
        dicom_port: int | None = None,
        startup_timeout: float = 30.0,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.workdir / "orthanc.log")
        self.aet = aet
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.startup_timeout = startup_timeout
        plugin_paths = list(plugins)
        if dicomweb:
            path = find_plugin(DICOMWEB_PLUGIN)
            if path is None:
                raise RuntimeError("the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)")
            plugin_paths.insert(0, path)
        storage = self.workdir / "storage"
        self.config = {
            "Name": f"lungburden-test-{self.http_port}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "SslEnabled": False,
            "StableAge": stable_age,
            "ConcurrentJobs": 2,
            "HttpThreadsCount": 8,
            "DicomThreadsCount": 4,
            "StorageCompression": False,
            "SaveJobs": False,
            "Plugins": plugin_paths,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
        }
        if extra_config:
            _deep_merge(self.config, extra_config)
        self.config_path = self.workdir / "orthanc.json"

    @property
    def auth(self) -> tuple[str, str] | None:
        """Basic credentials for the REST API: the first registered user when authentication is on."""
        users = self.config.get("RegisteredUsers") or {}
        if not self.config.get("AuthenticationEnabled") or not users:
            return None
        return next(iter(users.items()))

    # -- URLs ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    # -- the process -----------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [ORTHANC_BINARY, "--no-jobs", str(self.config_path)]

    def working_dir(self) -> Path:
        return self.workdir

    def prepare(self) -> None:
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/system", timeout=1, auth=self.auth).ok
        except requests.RequestException:
            return False

    # -- REST helpers --------------------------------------------------------------------------
    def get(self, path: str, **kwargs) -> object:
        kwargs.setdefault("auth", self.auth)
        response = requests.get(f"{self.url}{path}", timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()

    def get_bytes(self, path: str) -> bytes:
        response = requests.get(f"{self.url}{path}", timeout=30, auth=self.auth)
        response.raise_for_status()
        return response.content

    def post(self, path: str, data: object = None, json_body: object = None) -> object:
        response = requests.post(f"{self.url}{path}", data=data, json=json_body, timeout=60, auth=self.auth)
        response.raise_for_status()
        return response.json() if response.content else None

    def delete(self, path: str) -> None:
        requests.delete(f"{self.url}{path}", timeout=30, auth=self.auth).raise_for_status()

    def upload(self, path: Path) -> dict:
        """Store a DICOM file through the REST API (``POST /instances``)."""
        return self.post("/instances", data=Path(path).read_bytes())  # type: ignore[return-value]

    def find(self, level: str, query: dict[str, str], expand: bool = True) -> list:
        """``POST /tools/find`` (level: Patient, Study, Series, Instance)."""
        return self.post("/tools/find", json_body={"Level": level, "Query": query, "Expand": expand})  # type: ignore

    def series_in_study(self, study_instance_uid: str) -> list[dict]:
        """Expanded series of a study (empty if Orthanc does not know the study)."""
        return self.find("Series", {"StudyInstanceUID": study_instance_uid})

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get_bytes(f"/instances/{orthanc_id}/file")

