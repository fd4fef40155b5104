import os
from pathlib import Path

from ._log import record


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    target = Path(os.environ["STANDIN_DRIVE"])
    target.mkdir(parents=True, exist_ok=True)
    record(f"drive.mount {mountpoint}")


def flush_and_unmount(timeout_ms=86400000):
    record("drive.flush_and_unmount")
