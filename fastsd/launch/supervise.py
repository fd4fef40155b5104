"""Run a web UI server as a supervised child process.

- The server runs in its own process group (session), so stopping it stops everything it
  started (A1111 spawns helpers; a leftover process would hold the GPU and the port).
- Its output (stderr merged into stdout) is teed: to the caller's ``echo`` and to a log file,
  secrets masked (registered ones, secret-named environment variables, token-shaped strings). The live log is on local disk; a copy goes to ``<home>/logs`` through the
  safe-write helper when the server becomes ready, crashes or stops (Drive files are never
  appended to).
- Readiness is decided by polling the server's HTTP endpoint until it answers 200, never by
  parsing its log: log lines change between versions, an answering endpoint does not.
- When it is not ready in time, or crashes more often than the restart bound allows, the error
  carries the last 40 log lines and the likely cause (:func:`likely_cause`).
- :meth:`Supervisor.stop` (also on Ctrl-C / a notebook cell interrupt via the context manager,
  and at interpreter exit) sends SIGTERM to the group, then SIGKILL after a grace period.
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .. import storage
from ..errors import FastsdError
from ..redact import mask, mask_command, register, register_environment

TAIL_LINES = 40

#: (pattern in the log, likely cause and what to do). First match wins, so specific before general.
FAILURE_CAUSES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), cause)
    for p, cause in (
        (
            r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED",
            "the GPU ran out of memory: close other notebooks using it, pick a smaller model, "
            "or use --lowvram/--medvram (A1111) ",
        ),
        (
            r"Torch is not able to use GPU|does not support the current version of Torch|no CUDA GPUs are available|"
            r"Found no NVIDIA driver",
            "torch cannot use a GPU: in Colab choose Runtime > Change runtime type > T4 GPU, then run again",
        ),
        (
            r"Address already in use|Errno 98|Cannot find empty port|port .* is (?:already )?in use",
            "the port is taken, most likely by a server from an earlier run: stop it or pass another --port",
        ),
        (r"No space left on device|Errno 28", "the disk is full: free space (or use --temp less) and run again"),
        (
            r"Couldn't clone|Repository not found|fatal: repository .* not found|Could not resolve host",
            "a repository the backend clones on its first start could not be fetched: check the network, "
            "or try another --ref",
        ),
        (
            r"SafetensorError|Error while deserializing header|invalid load key|unexpected EOF",
            "a model file is damaged or incomplete (an interrupted download?): delete it and download it again",
        ),
        (
            r"Error\(s\) in loading state_dict|size mismatch for",
            "a model does not match what the backend expected (another family or a LoRA used as a checkpoint)",
        ),
        (
            r"No checkpoints found|Can't run without a checkpoint|no model selected",
            "no checkpoint found: put a .safetensors model in <home>/models or pass --model FILE",
        ),
        (
            r"ModuleNotFoundError: No module named '([^']+)'",
            "a Python package is missing ({0}): run fastsd webui again (it installs requirements); if it "
            "persists, an extension needs it",
        ),
        (
            r"ImportError: cannot import name|AttributeError: module '[^']+' has no attribute",
            "an installed package does not match the backend's version: try the pinned commit (drop --ref) "
            "or remove the extension that fails",
        ),
        (r"Couldn't install|Error running install\.py", "the backend's own installer failed (see the lines above)"),
        (
            r"\bKilled\b|exit code -9|signal 9",
            "the process was killed, usually for running out of RAM (Colab: 12.7 GB)",
        ),
    )
)


class BackendError(FastsdError):
    """The server did not start or kept crashing; ``str`` carries the cause, ``tail`` the log."""

    def __init__(self, message: str, tail: list[str] | None = None) -> None:
        self.tail = tail or []
        body = "\n".join(f"    {line}" for line in self.tail)
        super().__init__(message + (f"\n  last {len(self.tail)} log lines:\n{body}" if self.tail else ""))


def likely_cause(lines: list[str], returncode: int | None = None) -> str | None:
    """The most likely cause of a failure, from log lines (and the exit code), or None."""
    text = "\n".join(lines)
    for pattern, cause in FAILURE_CAUSES:
        match = pattern.search(text)
        if match:
            return cause.format(*match.groups()) if match.groups() else cause
    if returncode is not None and returncode in (-9, 137):
        return FAILURE_CAUSES[-1][1]
    return None


class Supervisor:
    """One supervised server process (restarted on a crash up to ``max_restarts`` times).

    Example:
        >>> with Supervisor("demo", ["python", "-m", "http.server", "8000"], ready_url="http://127.0.0.1:8000/",
        ...                 log_path=Path("/tmp/demo.log")) as sup:  # doctest: +SKIP
        ...     sup.wait_ready()
        ...     sup.wait()
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        ready_url: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        auth: str | None = None,
        ready_timeout: float = 900.0,
        max_restarts: int = 2,
        mirror_path: Path | None = None,
        echo: Callable[[str], None] | None = print,
        poll_interval: float = 1.0,
        stop_grace: float = 10.0,
        restart_delay: float = 2.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready_url = ready_url
        self.log_path = Path(log_path)
        self.mirror_path = mirror_path
        self.env = env
        self.cwd = cwd
        self.auth = auth
        self.ready_timeout = ready_timeout
        self.max_restarts = max_restarts
        self.echo = echo
        self.poll_interval = poll_interval
        self.stop_grace = stop_grace
        self.restart_delay = restart_delay
        register(auth)
        # A backend may print a token it found on its own (an extension's config): the values of
        # fastsd's secret-named variables are masked in its output like registered secrets.
        register_environment()
        self.restarts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=400)
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._log_fh = None

    # ---- process

    def start(self) -> None:
        """Start the server (in a new process group) and the thread that tees its output."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log_fh is None:
            # Local disk only (see the module doc); truncated per run so it shows this run.
            self._log_fh = open(self.log_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115
        self._write(f"[fastsd] starting {self.name}: {mask_command(self.argv)}")
        self._stopping = False
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaches its children too
        )
        atexit.register(self.stop)
        self._reader = threading.Thread(target=self._pump, args=(self.proc,), name=f"tee-{self.name}", daemon=True)
        self._reader.start()

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            self._write(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        proc.stdout.close()

    def _write(self, line: str) -> None:
        line = mask(line)
        with self._lock:
            self.tail.append(line)
            if self._log_fh is not None:
                self._log_fh.write(line + "\n")
                self._log_fh.flush()
        if self.echo is not None:
            self.echo(line)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def last_lines(self, n: int = TAIL_LINES) -> list[str]:
        with self._lock:
            return list(self.tail)[-n:]

    def _drain(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)

    # ---- readiness

    def _probe(self) -> bool:
        import httpx  # the webui feature's HTTP client (features.py)

        headers = {}
        if self.auth:
            headers["Authorization"] = "Basic " + base64.b64encode(self.auth.encode()).decode()
        try:
            # trust_env=False: the server is on loopback, a proxy from the environment cannot reach it
            response = httpx.get(self.ready_url, headers=headers, timeout=5, follow_redirects=True, trust_env=False)
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError):
            return False
        return response.status_code == 200

    def wait_ready(self) -> str:
        """Poll until the server answers 200; restart it if it dies meanwhile (within the bound).

        Returns:
            The readiness URL.

        Raises:
            BackendError: not ready within ``ready_timeout`` seconds, or crashed too often.
        """
        if self.proc is None:
            self.start()
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self._probe():
                self._write(f"[fastsd] {self.name} is ready at {self.ready_url}")
                self.mirror()
                return self.ready_url
            if not self.running:
                self._crashed()
                deadline = time.monotonic() + self.ready_timeout
                continue
            if time.monotonic() > deadline:
                tail = self.last_lines()
                cause = likely_cause(tail) or (
                    "it is still starting or hangs: a first start downloads and installs a lot; "
                    "run again with a longer --timeout, and read the log"
                )
                self.stop()
                raise BackendError(
                    f"{self.name} did not answer {self.ready_url} within {self.ready_timeout:.0f} s: {cause} "
                    f"(full log: {self.mirror_path or self.log_path})",
                    tail,
                )
            time.sleep(self.poll_interval)

    def _crashed(self) -> None:
        assert self.proc is not None
        self._drain()
        code = self.proc.returncode
        tail = self.last_lines()
        cause = likely_cause(tail, code)
        self._write(f"[fastsd] {self.name} exited with code {code}")
        self._kill_group(self.proc)  # helpers it left behind
        self.mirror()
        if self.restarts >= self.max_restarts:
            raise BackendError(
                f"{self.name} exited with code {code} "
                + (f"after {self.restarts} restart(s) " if self.restarts else "")
                + f"and is not restarted again: {cause or 'see the log lines below'} "
                f"(full log: {self.mirror_path or self.log_path})",
                tail,
            )
        self.restarts += 1
        wait = min(self.restart_delay * self.restarts, 10.0)
        self._write(f"[fastsd] restarting {self.name} in {wait:.0f} s ({self.restarts}/{self.max_restarts})")
        time.sleep(wait)
        self.start()

    def wait(self) -> None:
        """Block while the server runs, restarting it on a crash (within the bound), until :meth:`stop`."""
        while not self._stopping:
            if self.proc is not None and self.proc.poll() is not None and not self._stopping:
                self._crashed()
                self.wait_ready()
            time.sleep(self.poll_interval)

    # ---- stopping

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop the server and everything it started: SIGTERM to its group, SIGKILL after the grace period."""
        self._stopping = True
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_grace)
                except subprocess.TimeoutExpired:
                    self._kill_group(proc)
                    proc.wait(timeout=10)
                self._write(f"[fastsd] stopped {self.name}")
            self._kill_group(proc)  # children that outlived their parent
            self._drain()
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        self.mirror()
        with self._lock:
            if self._log_fh is not None:
                self._log_fh.close()
                self._log_fh = None

    def mirror(self) -> None:
        """Copy the live log to ``mirror_path`` (``<home>/logs/...``) with a safe write."""
        if self.mirror_path is None or not self.log_path.is_file():
            return
        with contextlib.suppress(FastsdError, OSError):
            storage.copy_file(self.log_path, self.mirror_path, verify_sha256=False)

    def __enter__(self) -> Supervisor:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
