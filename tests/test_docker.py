"""The Docker images and the compose stack, built and run as a user would (docker/, docs/docker.md).

The module starts ``dockerd`` when no daemon answers, makes the base image ``debian:bookworm-slim``
with ``docker/make-base-image.sh`` when it is missing, builds both targets of ``docker/Dockerfile``
with this machine's pip settings (:mod:`docker_helpers`), then brings up ``docker/docker-compose.yml``
with the profile ``plugin``: an Orthanc PACS routing stable CT series to the node, the node, and
the Orthanc-with-plugin image. A phantom series goes by DCMTK ``storescu`` to the PACS and to the
plugin's Orthanc; both must get a SEG and an SR in the study with the numbers of
``lungburden analyze`` on the same series. Everything the module creates (containers, networks,
volumes, the two images, a daemon it started) is removed at the end; the base image and the
build cache stay, as a user's would.

It is skipped only where containers cannot run at all (no daemon, and no privileges to start one)
or the Debian packages are missing (``make system-deps``). Build or run errors fail it.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
import uuid
from pathlib import Path

import pydicom
import pytest
import requests
from ct_builders import write_phantom
from docker_helpers import COMPOSE_FILE, DOCKERFILE, REPO, DockerHost, DockerUnavailable, PipSource
from node_helpers import sr_numbers, storescu
from processes import free_port

import lungburden
from lungburden.dicom_node.demo import dcmtk_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAIT_S = 240.0
TIMINGS: dict[str, float] = {}


def _note(key: str, value: float) -> None:
    TIMINGS[key] = value
    print(f"docker timing: {key} = {value:.1f}")


@pytest.fixture(scope="module")
def docker_host(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("docker")
    if dcmtk_tool("storescu") is None:
        pytest.skip("needs DCMTK storescu (Debian package dcmtk; make system-deps)")
    try:
        host = DockerHost(workdir)
        start = time.monotonic()
        host.ensure_daemon()
    except FileNotFoundError as error:
        pytest.skip(f"{error}; make system-deps installs it")
    except DockerUnavailable as error:
        pytest.skip(f"containers cannot run on this machine: {error}")
    if host.daemon is not None:
        _note("dockerd start s", time.monotonic() - start)
    yield host
    host.close()


class Images:
    def __init__(self, tag: str):
        self.tag = tag
        self.node = f"lungburden:{tag}"
        self.orthanc = f"lungburden-orthanc:{tag}"


@pytest.fixture(scope="module")
def images(docker_host: DockerHost, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("docker-build")
    start = time.monotonic()
    if docker_host.ensure_base_image():
        _note("base image (debootstrap + import) s", time.monotonic() - start)
    built = Images(f"test-{uuid.uuid4().hex[:10]}")
    revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    pip = PipSource(workdir).start()
    try:
        args = {**pip.build_args(), "VERSION": lungburden.__version__,
                "REVISION": revision.stdout.strip() if revision.returncode == 0 else ""}
        log = workdir / "build.log"
        try:
            _note("build node s", docker_host.build("node", built.node, args, pip.secrets(), log))
            _note("build orthanc s", docker_host.build("orthanc", built.orthanc, args, pip.secrets(), log,
                                                       cache_from=built.node))
        except BaseException:
            for ref in (built.node, built.orthanc):
                docker_host.docker("image", "rm", ref, check=False)
            raise
    finally:
        pip.close()
    yield built
    for ref in (built.node, built.orthanc):
        docker_host.docker("image", "rm", ref, check=False)
    assert not docker_host.image_exists(built.node) and not docker_host.image_exists(built.orthanc)


def test_images_are_labelled_unprivileged_with_health_checks_and_no_build_tools(docker_host, images):
    for ref, user, check in ((images.node, "lungburden", "node"), (images.orthanc, "orthanc", "orthanc")):
        info = docker_host.inspect(ref)
        config = info["Config"]
        labels = config["Labels"]
        assert labels["org.opencontainers.image.version"] == lungburden.__version__
        assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
        assert "org.opencontainers.image.source" in labels and labels["io.lungburden.variant"] == "cpu"
        assert config["User"] == user
        assert config["Healthcheck"]["Test"] == ["CMD", "lungburden-healthcheck", check]
        _note(f"image size {ref.split(':')[0]} MB", info["Size"] / 1e6)
    # the weights inside, no compilers, no package or pip caches
    probe = ("lungburden models | head -n 1; "
             "python -c 'import lungburden, pathlib; print((pathlib.Path(lungburden.__file__).parent"
             " / \"weights\" / \"convlstm.pt\").stat().st_size)'; "
             "for t in gcc cc c++ make; do command -v $t; done; "
             "ls -A /var/lib/apt/lists /root/.cache /var/cache/apt/archives 2>/dev/null | grep -v -e '^partial$' "
             "-e '^lock$' -e ':$' -e '^$' || true")
    out = docker_host.docker("run", "--rm", "--user", "0", "--entrypoint", "sh", images.node, "-c",
                             probe).stdout.split()
    assert out[0] == "convlstm" and int(out[2]) > 100_000 and len(out) == 3, out
    for tool in ("gcc", "make"):
        assert docker_host.docker("run", "--rm", "--entrypoint", "sh", images.orthanc, "-c",
                                  f"command -v {tool}", check=False).returncode != 0
    # the version in the Dockerfile's and compose file's defaults is the package's
    assert set(re.findall(r"ARG VERSION=(\S+)", DOCKERFILE.read_text())) == {lungburden.__version__}
    assert set(re.findall(r"LUNGBURDEN_TAG:-([^}]+)}", COMPOSE_FILE.read_text())) == {lungburden.__version__}
    # without a password the Orthanc image refuses to start (EX_CONFIG)
    refused = docker_host.docker("run", "--rm", images.orthanc, check=False)
    assert refused.returncode == 78 and "ORTHANC_PASSWORD" in refused.stderr


class Stack:
    """``docker compose`` with a project of its own, the profile ``plugin`` and free host ports."""

    def __init__(self, host: DockerHost, images: Images):
        self.host = host
        self.project = f"lbtest{uuid.uuid4().hex[:8]}"
        self.password = secrets.token_urlsafe(16)
        self.ports = {name: free_port() for name in ("PACS_DICOM_PORT", "PACS_HTTP_PORT", "NODE_DICOM_PORT",
                                                     "NODE_HTTP_PORT", "PLUGIN_DICOM_PORT", "PLUGIN_HTTP_PORT")}
        self.env = {**host.env, "ORTHANC_PASSWORD": self.password, "LUNGBURDEN_TAG": images.tag,
                    "BIND_ADDRESS": "127.0.0.1", **{k: str(v) for k, v in self.ports.items()}}
        self.compose = [*host.compose_command(), "-p", self.project, "-f", str(COMPOSE_FILE), "--profile", "plugin"]

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.compose, *args], capture_output=True, text=True, env=self.env,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service).stdout.strip()

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "60", check=False).stdout[-12000:]

    def orthanc(self, service: str) -> OrthancRest:
        port = self.ports["PACS_HTTP_PORT" if service == "pacs" else "PLUGIN_HTTP_PORT"]
        return OrthancRest(f"http://127.0.0.1:{port}", ("orthanc", self.password))

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in (["ps", "-aq"], ["volume", "ls", "-q"], ["network", "ls", "-q"]):
            found += self.host.docker(*kind, "--filter", label).stdout.split()
        return found


class OrthancRest:
    def __init__(self, url: str, auth: tuple[str, str]):
        self.url, self.auth = url, auth

    def get(self, path: str):
        response = requests.get(self.url + path, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json() if "json" in response.headers.get("content-type", "") else response.content

    def answers(self, path: str = "/system") -> bool:
        try:
            return requests.get(self.url + path, auth=self.auth, timeout=5).ok
        except requests.RequestException:
            return False

    def study_series(self, study_uid: str) -> dict[str, list[str]]:
        """Modality -> Orthanc instance IDs of the study's series."""
        found = requests.post(self.url + "/tools/find", auth=self.auth, timeout=30, json={
            "Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})
        found.raise_for_status()
        out: dict[str, list[str]] = {}
        for series in found.json():
            out.setdefault(series["MainDicomTags"].get("Modality", ""), []).extend(series["Instances"])
        return out

    def dataset(self, instance_id: str) -> pydicom.Dataset:
        return pydicom.dcmread(pydicom.filebase.DicomBytesIO(self.get(f"/instances/{instance_id}/file")))


@pytest.fixture(scope="module")
def stack(docker_host, images):
    stack = Stack(docker_host, images)
    try:
        start = time.monotonic()
        stack.run("up", "-d", "--no-build")
        deadline = time.monotonic() + 120
        pacs, plugin = stack.orthanc("pacs"), stack.orthanc("orthanc-plugin")
        while time.monotonic() < deadline:
            status = plugin.get("/lungburden/status") if plugin.answers("/lungburden/status") else {}
            node_ok = docker_host.docker("exec", stack.container("node"), "lungburden-healthcheck", "node",
                                         check=False).returncode == 0
            if pacs.answers() and status.get("worker", {}).get("running") and node_ok:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"the stack did not come up in 120 s:\n{stack.logs()}")
        _note("compose up until ready s", time.monotonic() - start)
        yield stack
    finally:
        stack.run("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
    assert stack.leftovers() == []


@pytest.fixture(scope="module")
def sent(stack, tmp_path_factory) -> dict:
    """A phantom series stored into the PACS and into the plugin's Orthanc (``storescu``)."""
    folder = tmp_path_factory.mktemp("docker-phantom")
    files = write_phantom(folder / "series", seed=3, slices=24, size=256, slice_spacing_mm=10.0)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    start = time.monotonic()
    for port in (stack.ports["PACS_DICOM_PORT"], stack.ports["PLUGIN_DICOM_PORT"]):
        storescu(port, files, called="ORTHANC").check_returncode()
    return {"files": files, "study": str(header.StudyInstanceUID), "sent_at": start, "folder": folder}


@pytest.fixture(scope="module")
def analyzed(sent) -> Path:
    """``lungburden analyze`` on the same series, in this process (the reference numbers)."""
    from lungburden.cli import main as cli_main

    out = sent["folder"] / "analyze"
    assert cli_main(["analyze", str(sent["files"][0].parent), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def arrived(stack, sent) -> dict[str, dict[str, list[str]]]:
    """service -> the study's series in that Orthanc once SEG and SR are there (both polled together)."""
    services = {"pacs": stack.orthanc("pacs"), "orthanc-plugin": stack.orthanc("orthanc-plugin")}
    found: dict[str, dict[str, list[str]]] = {}
    deadline = sent["sent_at"] + WAIT_S
    while len(found) < len(services) and time.monotonic() < deadline:
        for service, orthanc in services.items():
            if service not in found:
                series = orthanc.study_series(sent["study"])
                if series.get("SEG") and series.get("SR"):
                    found[service] = series
                    _note(f"storescu -> SEG + SR in {service} s", time.monotonic() - sent["sent_at"])
        time.sleep(0.5)
    missing = sorted(set(services) - set(found))
    assert not missing, f"no SEG + SR in the study in {missing} after {WAIT_S} s:\n{stack.logs()}"
    return found


def _assert_same_as_analyze(orthanc: OrthancRest, series: dict[str, list[str]], analyzed: Path) -> None:
    assert len(series["SEG"]) == 1 and len(series["SR"]) == 1, series
    assert len(series["CT"]) == 24
    stored_sr, cli_sr = orthanc.dataset(series["SR"][0]), pydicom.dcmread(analyzed / "sr.dcm")
    numbers = sr_numbers(stored_sr)
    assert numbers and numbers == sr_numbers(cli_sr)
    stored_seg, cli_seg = orthanc.dataset(series["SEG"][0]), pydicom.dcmread(analyzed / "seg.dcm")
    assert int(stored_seg.NumberOfFrames) == int(cli_seg.NumberOfFrames)
    assert stored_seg.PixelData == cli_seg.PixelData


def test_compose_pacs_receives_seg_and_sr_of_the_node_equal_to_analyze(docker_host, stack, arrived, analyzed):
    _assert_same_as_analyze(stack.orthanc("pacs"), arrived["pacs"], analyzed)
    # the node's job and its delivery back to the PACS, as `lungburden jobs` reports them
    def node_jobs() -> list[tuple]:
        listing = json.loads(docker_host.docker("exec", stack.container("node"), "lungburden", "jobs", "--json",
                                                "--config", "/etc/lungburden/lungburden.yaml").stdout)
        return [(j["id"], j["state"], j["series_instance_uid"]) for j in listing["jobs"]]

    jobs = node_jobs()
    assert [state for _, state, _ in jobs] == ["done"], jobs
    assert docker_host.docker("exec", stack.container("pacs"), "lungburden-healthcheck", "orthanc",
                              check=False).returncode == 0
    # an upgrade recreates the container: the job database and the spool live on in the volume
    old_container = stack.container("node")
    stack.run("up", "-d", "--no-build", "--no-deps", "--force-recreate", "node")
    assert stack.container("node") != old_container
    assert node_jobs() == jobs


def test_plugin_image_stores_seg_and_sr_equal_to_analyze(docker_host, stack, arrived, analyzed):
    plugin = stack.orthanc("orthanc-plugin")
    _assert_same_as_analyze(plugin, arrived["orthanc-plugin"], analyzed)
    jobs = plugin.get("/lungburden/jobs")["jobs"]
    assert [j["state"] for j in jobs] == ["done"], jobs
    assert docker_host.docker("exec", stack.container("orthanc-plugin"), "lungburden-healthcheck", "orthanc",
                              check=False).returncode == 0
