"""A small client of Orthanc's REST API (the calls the worker makes; Orthanc Book, "REST API")."""

from __future__ import annotations

import threading
from typing import Any

import requests


class OrthancError(RuntimeError):
    """Orthanc answered with an HTTP error (``status`` holds the code)."""

    def __init__(self, method: str, path: str, status: int, body: str):
        self.status = status
        super().__init__(f"{method} {path}: HTTP {status} {body[:300]}".strip())


class OrthancUnavailable(RuntimeError):
    """Orthanc's REST API cannot be reached (not started yet, or stopping)."""


class OrthancClient:
    """Thread-safe (one :class:`requests.Session` per thread) access to one Orthanc server."""

    def __init__(self, url: str, authorization: str | None = None, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.authorization = authorization
        self.timeout = timeout
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Orthanc deflates answers when asked to (HttpCompressionEnabled): 20x slower for DICOM files.
            session.headers["Accept-Encoding"] = "identity"
            if self.authorization:
                session.headers["Authorization"] = self.authorization
            self._local.session = session
        return session

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self._session().request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.ConnectionError as exc:
            raise OrthancUnavailable(f"Orthanc at {self.url} is not reachable ({type(exc).__name__})") from exc
        if response.status_code >= 400:
            raise OrthancError(method, path, response.status_code, response.text)
        return response

    def get_json(self, path: str) -> Any:
        return self.request("GET", path).json()

    def get_bytes(self, path: str) -> bytes:
        return self.request("GET", path).content

    def post_json(self, path: str, body: Any) -> Any:
        response = self.request("POST", path, json=body)
        return response.json() if response.content else None

    def delete(self, path: str) -> bool:
        """DELETE a resource; ``False`` if it did not exist."""
        try:
            self.request("DELETE", path)
        except OrthancError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def store_instance(self, data: bytes) -> str:
        """``POST /instances`` one PS3.10 file; returns its Orthanc ID (also when already stored)."""
        answer = self.request("POST", "/instances", data=data,
                              headers={"Content-Type": "application/dicom"}).json()
        return str(answer["ID"])

    def lookup_instance(self, sop_instance_uid: str) -> str | None:
        """The Orthanc ID of the instance with this SOP Instance UID (``POST /tools/lookup``), or None."""
        answer = self.request("POST", "/tools/lookup", data=sop_instance_uid.encode()).json()
        return next((str(r["ID"]) for r in answer if r.get("Type") == "Instance"), None)

    def system(self) -> dict:
        return self.get_json("/system")
