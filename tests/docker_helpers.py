"""Docker for the image tests: the daemon, the base image, pip's settings as build arguments, builds.

- :class:`DockerHost` finds a Docker client that builds with BuildKit, starts ``dockerd`` when
  none answers (and stops it again), and makes the base image ``debian:bookworm-slim`` with
  ``docker/make-base-image.sh`` (debootstrap + ``docker import``) when it is missing.
- :class:`PipSource` turns this machine's pip configuration (``pip config list``, ``PIP_*``)
  into the images' build arguments: local folders (``find-links``, ``file://`` indexes) are
  served over HTTP on 127.0.0.1 for the build (``--network host``), remote URLs are passed as
  they are, and pip's ``cert`` becomes the build secret ``pip_cert``.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE_FILE = REPO / "docker" / "docker-compose.yml"
BASE_IMAGE = "debian:bookworm-slim"
DEBIAN_CLIENT = "/usr/bin/docker"
# The port pip's local folders are served on during builds: a fixed one, so that the build
# arguments, and with them Docker's build cache, are the same from one run to the next.
SERVE_PORT = 38761  # Debian's docker.io client: the daemon's version, BuildKit built in


class DockerUnavailable(Exception):
    """This machine cannot run containers (no privileges to start a daemon)."""


def _run(args: list[str], timeout: float = 600, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} ... exited with {result.returncode}:\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


class DockerHost:
    """The Docker client and daemon the tests use; :meth:`close` stops a daemon started here."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.daemon: subprocess.Popen | None = None
        self.client = self._client()
        self.env = {**os.environ, "DOCKER_BUILDKIT": "1"}

    # -- client --------------------------------------------------------------------------------
    @staticmethod
    def _client() -> str:
        """A client whose ``docker build`` is BuildKit: one with buildx, or one older than 23
        (BuildKit built in, ``DOCKER_BUILDKIT=1``), as Debian 12's docker.io."""
        candidates = [c for c in (shutil.which("docker"), DEBIAN_CLIENT) if c and os.access(c, os.X_OK)]
        if not candidates:
            raise FileNotFoundError("no docker client (Debian package docker.io)")
        for client in dict.fromkeys(candidates):
            if subprocess.run([client, "buildx", "version"], capture_output=True).returncode == 0:
                return client
            version = subprocess.run([client, "--version"], capture_output=True, text=True).stdout
            major = re.search(r"version (\d+)\.", version)
            if major and int(major.group(1)) < 23:
                return client
        raise RuntimeError(f"none of the docker clients {candidates} builds with BuildKit: install the buildx "
                           "plugin or Debian's docker.io")

    def docker(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return _run([self.client, *args], timeout=timeout, env=self.env, check=check)

    # -- daemon --------------------------------------------------------------------------------
    def answers(self) -> bool:
        return subprocess.run([self.client, "info"], capture_output=True, env=self.env, timeout=30).returncode == 0

    def ensure_daemon(self, timeout: float = 60.0) -> None:
        """Start ``dockerd`` (as root, its default data root) unless a daemon answers."""
        if self.answers():
            return
        dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if os.path.exists("/usr/sbin/dockerd") else None)
        if dockerd is None:
            raise FileNotFoundError("dockerd is not installed (Debian package docker.io)")
        if os.geteuid() != 0:
            raise DockerUnavailable("no Docker daemon answers and starting dockerd needs root")
        log_path = self.workdir / "dockerd.log"
        with log_path.open("ab") as log:
            self.daemon = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                text = log_path.read_text(errors="replace")
                self.daemon = None
                if self.answers():  # another run started one at the same moment
                    return
                if re.search(r"operation not permitted|permission denied|must be run as root", text, re.I):
                    raise DockerUnavailable(f"dockerd cannot start here:\n{text[-2000:]}")
                raise RuntimeError(f"dockerd exited:\n{text[-4000:]}")
            if self.answers():
                return
            time.sleep(0.5)
        raise RuntimeError(f"dockerd not answering after {timeout} s:\n{log_path.read_text(errors='replace')[-4000:]}")

    def close(self) -> None:
        """Stop the daemon if this object started it and no container runs on it any more (another
        run on this machine may have found it answering and use it); images and cache stay on disk."""
        if self.daemon is not None and self.daemon.poll() is None:
            running = self.docker("ps", "-q", check=False)
            if running.returncode == 0 and running.stdout.strip():
                self.daemon = None
                return
            self.daemon.terminate()
            try:
                self.daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(timeout=10)
        self.daemon = None

    # -- images --------------------------------------------------------------------------------
    def image_exists(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False).returncode == 0

    def ensure_base_image(self) -> bool:
        """Make ``debian:bookworm-slim`` from Debian's packages if it is missing; True if made."""
        if self.image_exists(BASE_IMAGE):
            return False
        if shutil.which("debootstrap") is None and not os.path.exists("/usr/sbin/debootstrap"):
            raise FileNotFoundError("debootstrap is not installed (Debian package debootstrap)")
        env = {**self.env, "PATH": f"{os.path.dirname(self.client)}:{self.env.get('PATH', '')}:/usr/sbin:/sbin"}
        _run(["sh", str(REPO / "docker" / "make-base-image.sh"), BASE_IMAGE], timeout=900, env=env)
        return True

    def build(self, target: str, tag: str, build_args: dict[str, str], secrets: dict[str, str],
              log_path: Path, cache_from: str | None = None) -> float:
        """``docker build --target`` from the repository root; returns the seconds it took.

        The image carries its cache metadata (``BUILDKIT_INLINE_CACHE``), so that the next target
        reuses its layers explicitly (``cache_from``): torch is installed once per run."""
        args = [self.client, "build", "--network", "host", "-f", str(DOCKERFILE), "--target", target, "-t", tag,
                "--progress", "plain", "--build-arg", "BUILDKIT_INLINE_CACHE=1"]
        if cache_from:
            args += ["--cache-from", cache_from]
        for key, value in build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        for name, path in secrets.items():
            args += ["--secret", f"id={name},src={path}"]
        start = time.monotonic()
        with log_path.open("ab") as log:
            result = subprocess.run([*args, str(REPO)], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                    timeout=1500)
        if result.returncode != 0:
            raise RuntimeError(f"docker build --target {target} failed:\n"
                               f"{log_path.read_text(errors='replace')[-6000:]}")
        return time.monotonic() - start

    def inspect(self, ref: str) -> dict:
        return json.loads(self.docker("image", "inspect", ref).stdout)[0]

    def compose_command(self) -> list[str]:
        """``docker compose`` (v2 plugin) or ``docker-compose`` (Debian's 1.29)."""
        if subprocess.run([self.client, "compose", "version"], capture_output=True).returncode == 0:
            return [self.client, "compose"]
        legacy = shutil.which("docker-compose")
        if legacy is None:
            raise FileNotFoundError("neither `docker compose` nor docker-compose (Debian package docker-compose)")
        return [legacy]


# -- pip's settings as build arguments ----------------------------------------------------------

def pip_settings(python: str = sys.executable) -> dict[str, list[str]]:
    """pip's index, extra indexes, find-links, trusted hosts and cert as this machine sets them."""
    out: dict[str, list[str]] = {}
    listing = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        out.setdefault(option, [])
        out[option] += [v for v in value.strip().strip("'\"").split() if v not in out[option]]
    return out


class PipSource:
    """Build arguments and secrets that give the image build the packages this machine's pip gets."""

    def __init__(self, workdir: Path, settings: dict[str, list[str]] | None = None, torch_version: str = "2.13.0"):
        self.settings = pip_settings() if settings is None else settings
        self.served = Path(tempfile.mkdtemp(prefix="pip-served-", dir=workdir))
        self.server: http.server.ThreadingHTTPServer | None = None
        self.torch_version = torch_version
        self._links = 0
        self._local_torch = False
        self._args: dict[str, str] | None = None

    def _local_dir(self, location: str) -> Path | None:
        if location.startswith("file:"):
            return Path(unquote(urlparse(location).path))
        if "://" not in location and os.path.isdir(location):
            return Path(location)
        return None

    def _serve(self, folder: Path, sub: str = "") -> str:
        assert self.server is not None
        name = f"d{self._links}"
        self._links += 1
        (self.served / name).symlink_to(folder, target_is_directory=True)
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}/{sub}"

    def start(self) -> PipSource:
        handler = functools.partial(_QuietHandler, directory=str(self.served))
        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", SERVE_PORT), handler)
        except OSError:  # taken (another build at the same time): any port, at the cost of the cache
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def build_args(self) -> dict[str, str]:
        if self._args is None:
            self._args = self._build_args()
        return dict(self._args)

    def _build_args(self) -> dict[str, str]:
        args: dict[str, str] = {}
        index = self.settings.get("index-url", [])
        if index:
            args["PIP_INDEX_URL"] = self._url(index[0], index=True)
        extra = [self._url(u, index=True) for u in self.settings.get("extra-index-url", [])]
        if extra:
            args["PIP_EXTRA_INDEX_URL"] = " ".join(extra)
        links = [self._url(u, index=False) for u in self.settings.get("find-links", [])]
        if links:
            args["PIP_FIND_LINKS"] = " ".join(links)
        if self.settings.get("trusted-host"):
            args["PIP_TRUSTED_HOST"] = " ".join(self.settings["trusted-host"])
        if self._local_torch:  # the CPU wheel is here: no PyTorch index
            args["TORCH_INDEX_URL"] = ""
        return args

    def _url(self, location: str, index: bool) -> str:
        folder = self._local_dir(location)
        if folder is None:
            return location
        if index:  # a PEP 503 tree whose pages link relative to its parent (../../files/...)
            if (folder / "torch").is_dir():
                self._local_torch = True
            return self._serve(folder.parent, f"{folder.name}/")
        if any(folder.glob(f"torch-{self.torch_version}+cpu-*.whl")):
            self._local_torch = True
        return self._serve(folder)

    def secrets(self) -> dict[str, str]:
        cert = self.settings.get("cert", [])
        return {"pip_cert": cert[0]} if cert and os.path.isfile(cert[0]) else {}

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        shutil.rmtree(self.served, ignore_errors=True)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass
