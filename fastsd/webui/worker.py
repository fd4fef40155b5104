"""One GPU worker: a FIFO queue of jobs run on a single thread, and the live job state.

Every job that touches the model (generation, model switch, option changes that reload
weights) runs on this one thread, in submission order, so the pipeline is never used by two
requests at once while the HTTP side stays free to answer ``progress``, ``interrupt`` and more
requests. :class:`JobState` mirrors A1111's ``shared.state``: ``interrupt`` and ``skip`` only
flag the job that is running now; the next job starts with clean flags.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class JobState:
    """What the running job is doing; written by the worker thread, read by anyone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.job = ""
        self.job_id = 0
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.interrupted = False
        self.skipped = False
        self.started_at: float | None = None
        self.job_timestamp = "0"
        self.latents: Any = None  # last step's latents, for the live preview (converted on request)
        self.family = "sd1"  # fastsd.models.detect's family names
        self.textinfo: str | None = None

    def begin(self, name: str, job_id: int) -> None:
        with self._lock:
            self.job, self.job_id = name, job_id
            self.job_count, self.job_no, self.sampling_step, self.sampling_steps = 0, 0, 0, 0
            self.interrupted = self.skipped = False
            self.started_at = time.time()
            self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
            self.latents, self.textinfo = None, None

    def end(self) -> None:
        with self._lock:
            self.job, self.job_count, self.job_no = "", 0, 0
            self.sampling_step = self.sampling_steps = 0
            self.started_at, self.latents = None, None

    @property
    def busy(self) -> bool:
        return bool(self.job)

    def interrupt(self) -> None:
        """Stop the running job after its current step (its partial images are still returned)."""
        with self._lock:
            if self.job:
                self.interrupted = True

    def skip(self) -> None:
        """Stop the running batch after its current step and go on with the job's next batch."""
        with self._lock:
            if self.job:
                self.skipped = True

    def progress(self) -> tuple[float, float]:
        """(progress 0..1, eta_relative seconds) computed the way A1111's progress API does."""
        if not self.job or self.started_at is None:
            return 0.0, 0.0
        progress = 0.01
        if self.job_count > 0:
            progress += self.job_no / self.job_count
            if self.sampling_steps > 0:
                progress += self.sampling_step / self.sampling_steps / self.job_count
        progress = min(progress, 1.0)
        elapsed = time.time() - self.started_at
        return progress, max(elapsed / progress - elapsed, 0.0)

    def as_dict(self) -> dict[str, Any]:
        """The ``state`` object of A1111's ``/sdapi/v1/progress``."""
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": False,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }


@dataclass
class _Job:
    job_id: int
    name: str
    fn: Callable[[], Any]
    future: Future


class Worker:
    """FIFO job queue served by one daemon thread.

    Example:
        >>> w = Worker(); w.submit(lambda: 1 + 1, "add").result()
        2
    """

    def __init__(self) -> None:
        self.state = JobState()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        self.submitted = 0  # jobs submitted so far (the last job's number)
        self._thread = threading.Thread(target=self._run, name="fastsd-gpu-worker", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], name: str = "job") -> Future:
        """Queue ``fn`` to run after every job submitted before it; returns its Future.

        The job's number (1, 2, ...: the order of submission) is on ``future.job_id``.
        """
        with self._ids_lock:  # the id order and the queue order must agree
            job = _Job(next(self._ids), name, fn, Future())
            self.submitted = job.job_id
            job.future.job_id = job.job_id  # type: ignore[attr-defined]
            self._queue.put(job)
        return job.future

    @property
    def pending(self) -> int:
        """Jobs waiting behind the running one."""
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            self.state.begin(job.name, job.job_id)
            try:
                result = job.fn()
            except BaseException as err:  # noqa: BLE001 - handed to the waiting caller, never lost
                job.future.set_exception(err)
            else:
                job.future.set_result(result)
            finally:
                self.state.end()

    def stop(self, timeout: float = 30) -> bool:
        """Interrupt the running job, cancel waiting ones, and end the thread.

        Returns True when the thread ended within ``timeout`` (False: a job that cannot be
        interrupted, such as a model load, is still running; the thread is a daemon).
        """
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        self.state.interrupt()
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()
