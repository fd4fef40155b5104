"""The crash test: kill -9 a process writing checkpoints and session.json at random points, many times.

After every kill the session must load, every listed checkpoint (so the latest one too) must
verify by sha256, no partial checkpoint may be listed, and ``clean()`` must leave no leftovers.
The next writer must get the lock without --force (the dead holder is detected).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastsd import storage
from fastsd.locks import read_lock
from fastsd.session import Session

REPO = Path(__file__).resolve().parent.parent

WRITER = r"""
import json, os, sys
from pathlib import Path
from fastsd.session import Session

home, work = sys.argv[1], Path(sys.argv[2])
s = Session.open("crash", home)
with s.lock(heartbeat=0, command="crash-test writer"):
    s.clean()
    step = (s.latest_checkpoint() or {"step": 0})["step"]
    print("ready", flush=True)
    while True:
        step += 10
        # the local work dir holds the state to save; it differs per step
        (work / "unet").mkdir(parents=True, exist_ok=True)
        (work / "unet" / "weights.bin").write_bytes(os.urandom(700_000))
        (work / "optimizer.bin").write_bytes(os.urandom(300_000))
        (work / "state.json").write_text(json.dumps({"step": step}))
        s.record_checkpoint(step, work)
        for i in range(5):
            s.update(progress={"step": step, "total_steps": 100000, "i": i}, notes="x" * 20_000)
        s.prune_checkpoints(keep=2)
"""


def test_kill_9_while_writing_never_corrupts_the_session(home, tmp_path):
    Session.create("crash", home)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(1234)
    iterations, leftovers_seen, steps = 24, 0, []
    deadline = time.monotonic() + 90
    for _ in range(iterations):
        if time.monotonic() > deadline:
            break
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(home), str(work)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = proc.stdout.readline()
            assert line.strip() == "ready", proc.stderr.read()
            time.sleep(rng.uniform(0.02, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()

        s = Session.open("crash", home)  # always loads
        listed = s.info["checkpoints"]
        for entry in listed:  # a listed checkpoint is complete: folder there, every hash matches
            assert (s.path / entry["path"]).is_dir(), entry
            assert s.verify_checkpoint(entry), entry
        if listed:
            assert s.verify_checkpoint(s.latest_checkpoint())
            steps.append(s.latest_checkpoint()["step"])
        lock = read_lock(s.path)
        assert lock is not None and lock["pid"] == proc.pid  # left behind by the dead writer

        removed = s.clean()
        leftovers_seen += bool(removed)
        assert list(s.path.rglob(f"{storage.TEMP_PREFIX}*")) == []
        on_disk = {p.relative_to(s.path).as_posix() for p in s.checkpoints_dir.glob("step-*")}
        assert on_disk == {c["path"] for c in listed}

    print(f"steps {steps}, leftovers cleaned after {leftovers_seen} kills")
    assert len(steps) >= 10 and steps == sorted(steps), steps  # progress kept growing across kills
    assert leftovers_seen >= 3  # the kills really landed mid-write
