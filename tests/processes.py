"""The one wrapper of the programs the integration tests run in the background (node, Orthanc).

A :class:`ManagedProcess` appends the program's output to a log file, starts it in a process
group of its own (as a service manager would), waits until :meth:`~ManagedProcess.ready` says it
answers, and stops it with SIGTERM, then SIGKILL. Subclasses say what to run and when it is ready.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ManagedProcess:
    """A background program with its log in ``log_path``; usable as a context manager."""

    #: Named in error messages.
    name = "process"
    #: Seconds :meth:`start` waits for :meth:`ready`.
    startup_timeout = 60.0
    #: Seconds :meth:`stop` waits after SIGTERM before SIGKILL.
    stop_timeout = 30.0

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    # -- what subclasses define ----------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The program's environment (default: this one)."""
        return None

    def working_dir(self) -> Path | None:
        return None

    def prepare(self) -> None:
        """Called before each start (write configuration files, remove stale markers)."""

    def ready(self) -> bool:
        """True once the program answers."""
        raise NotImplementedError

    # -- life cycle ----------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> ManagedProcess:
        if self.running:
            return self
        self.prepare()
        timeout = self.startup_timeout if timeout is None else timeout
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.environment(), cwd=self.working_dir(), start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def restart(self) -> ManagedProcess:
        self.stop()
        return self.start()

    def kill(self) -> None:
        """``kill -9`` of the program alone (not its process group)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def terminate_group(self, timeout: float = 30.0) -> float:
        """SIGTERM to the whole process group (``timeout``, systemd); returns the seconds to exit."""
        assert self.process is not None
        start = time.monotonic()
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout)
        self.process = None
        return time.monotonic() - start

    def children(self) -> list[int]:
        """PIDs of the program's child processes."""
        if self.process is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
