"""Hostile tests of sessions (issue 13): crafted session.json files and imports, concurrent writers,
random kills. Each test performs the attack and checks that nothing outside the session changed
(the tree around it is hashed before and after). Trials are bounded and seeded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastsd import storage
from fastsd.cli import main as cli_main
from fastsd.errors import SessionLockedError, UserInputError
from fastsd.locks import LOCK_FILE, SessionLock, read_lock
from fastsd.session import Session, list_sessions

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _tree(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` (folders included as entries), ``skip`` subtrees left out."""
    out = {}
    for p in sorted(root.rglob("*")):
        if any(p == s or s in p.parents for s in skip):
            continue
        out[p.relative_to(root).as_posix()] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _photo(path: Path, i: int, size: int = 96) -> Path:
    a = np.zeros((size, size, 3), np.uint8)
    a[..., 0] = (i * 37) % 256
    a[..., 1] = np.arange(size, dtype=np.uint8)[None, :]
    a[..., 2] = (i * 11) % 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- finding 1: paths in session.json


def _session_zip(tmp_path: Path, name: str, info_changes: dict, files: dict[str, bytes]) -> Path:
    info = {"name": name, "resolution": 512, "checkpoints": [], "models": [], **info_changes}
    archive = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(f"{name}/session.json", json.dumps(info))
        for rel, data in files.items():
            z.writestr(f"{name}/{rel}", data)
    return archive


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("../../..", "a path climbing out of the session"),
        ("ABSOLUTE", "an absolute path"),
        ("instance_images", "the training photos posing as a checkpoint"),
        ("checkpoints/step-000001/../../..", "a checkpoint path that climbs out"),
    ],
)
def test_import_never_deletes_what_a_shared_session_names(home, tmp_path, capsys, path, why):
    outside = tmp_path / "precious"
    _photo(outside / "keep.png", 1)
    other = Session.create("other", home)
    _photo(other.instance_dir / "mine.png", 2)
    path = str(outside) if path == "ABSOLUTE" else path
    photo = _photo(tmp_path / "src" / "a.png", 3).read_bytes()
    archive = _session_zip(
        tmp_path,
        "evil",
        {"checkpoints": [{"step": 1, "path": path, "files": {"a.png": hashlib.sha256(photo).hexdigest()}}]},
        {"instance_images/a.png": photo},
    )
    before = _tree(tmp_path, skip=(home / "sessions" / "evil",))
    code, _, err = _cli(capsys, "--root", str(home), "session", "import", str(archive))
    assert code == 2, why
    assert err.startswith("fastsd: error: cannot import ") and err.count("\n") == 1
    assert f"session.json: checkpoints[0].path: {path!r} is not a checkpoint folder inside the session" in err
    assert _tree(tmp_path, skip=(home / "sessions" / "evil",)) == before, why
    assert list_sessions(home) == ["other"]
    assert [p for p in (home / "sessions").iterdir() if p.name.startswith(".fastsd-tmp")] == []


def test_a_local_session_json_naming_outside_paths_is_refused_before_any_delete(home, tmp_path, capsys):
    outside = tmp_path / "precious"
    _photo(outside / "keep.png", 1)
    s = Session.create("local", home)
    _photo(s.instance_dir / "a.png", 2)
    cases = [
        ("checkpoints", [{"step": 1, "path": "instance_images", "files": {"a.png": "x"}}], "checkpoints[0].path"),
        ("checkpoints", [{"step": 1, "path": "../../../precious", "files": {}}], "checkpoints[0].path"),
        ("models", [{"file": "../../../precious/keep.png", "sha256": "x"}], "models[0].file"),
        ("models", [{"file": "models/../session.json"}], "models[0].file"),
        ("images", {"../../../precious/keep.png": {}}, "images['../../../precious/keep.png']"),
    ]
    good = json.loads((s.path / "session.json").read_text())
    for key, value, where in cases:
        (s.path / "session.json").write_text(json.dumps({**good, key: value}))
        before = _tree(tmp_path, skip=(s.path / "session.json",))
        with pytest.raises(UserInputError, match=rf"^session local: session.json: {__import__('re').escape(where)}: "):
            Session.open("local", home).prune_checkpoints(0)
        code, _, err = _cli(capsys, "--root", str(home), "session", "show", "local")
        assert code == 2 and f"session local: session.json: {where}: " in err and "unexpected" not in err
        assert _tree(tmp_path, skip=(s.path / "session.json",)) == before


def test_a_symlinked_checkpoint_folder_is_not_followed_out(home, tmp_path):
    outside = tmp_path / "precious"
    _photo(outside / "keep.png", 1)
    s = Session.create("links", home)
    (s.checkpoints_dir / "step-000001").symlink_to(outside, target_is_directory=True)
    info = json.loads((s.path / "session.json").read_text())
    info["checkpoints"] = [{"step": 1, "path": "checkpoints/step-000001", "files": {"keep.png": "x"}}]
    (s.path / "session.json").write_text(json.dumps(info))
    with pytest.raises(UserInputError, match="checkpoints\\[0\\].path: 'checkpoints/step-000001' is not a checkpoint"):
        Session.open("links", home)
    assert (outside / "keep.png").is_file()


# ---------------------------------------------------------------- finding 7: structurally wrong session.json


def _valid_info(s: Session) -> dict:
    info = json.loads((s.path / "session.json").read_text())
    info["progress"] = {"step": 20, "total_steps": 40}
    info["checkpoints"] = [
        {"step": 20, "path": "checkpoints/step-000020", "files": {"state.json": "ab"}, "sizes": {"state.json": 2}}
    ]
    info["models"] = [{"file": "models/m.safetensors", "kind": "lora", "step": 20, "sha256": "cd", "size": 3}]
    info["images"] = {"a.png": {"source": "a.jpg", "sha256": "ef", "crop": "center"}}
    return info


def _mutations(info: dict, rng: random.Random, count: int) -> list[tuple[str, dict]]:
    """Seeded structural damage: a key removed, or a value replaced by one of the wrong type."""
    nodes: list[tuple[tuple, object]] = []

    def walk(obj: object, path: tuple) -> None:
        nodes.append((path, obj))
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, (*path, k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, (*path, i))

    walk(info, ())
    wrong = [None, 7, -3, 1.5, True, "x", "../..", [], [1], {}, {"a": 1}]
    out = []
    for _ in range(count):
        path, _node = rng.choice(nodes[1:])
        mutated = copy.deepcopy(info)
        parent = mutated
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and rng.random() < 0.35:
            del parent[path[-1]]
            out.append((f"del {path}", mutated))
        else:
            value = rng.choice(wrong)
            parent[path[-1]] = value
            out.append((f"{path} = {value!r}", mutated))
    top = [None, 3, "text", [], [{"step": 1}]]
    out += [(f"whole file = {v!r}", v) for v in top]
    return out


def test_fifty_damaged_session_files_give_one_line_each_and_list_keeps_the_others(home, capsys):
    good = Session.create("good", home)
    broken = Session.create("broken", home)
    for sub in ("checkpoints/step-000020", "models"):
        (broken.path / sub).mkdir(parents=True, exist_ok=True)
    (broken.path / "checkpoints/step-000020/state.json").write_text("{}")
    (broken.path / "models/m.safetensors").write_bytes(b"abc")
    _photo(broken.instance_dir / "a.png", 1)
    info = _valid_info(broken)
    (broken.path / "session.json").write_text(json.dumps(info))
    assert _cli(capsys, "--root", str(home), "session", "show", "broken")[0] == 0  # the base is valid
    refused = 0
    for what, mutated in _mutations(info, random.Random(13), 45):
        (broken.path / "session.json").write_text(json.dumps(mutated))
        code, out, err = _cli(capsys, "--root", str(home), "session", "show", "broken")
        assert "unexpected error" not in err and "Traceback" not in err, what
        if code:
            refused += 1
            assert code == 2 and err.startswith("fastsd: error: session broken: session.json") and err.count("\n") == 1
        code, out, err = _cli(capsys, "--root", str(home), "session", "list", "--json")
        assert code == 0 and "unexpected" not in err, what
        rows = {r["name"]: r for r in json.loads(out)}
        assert set(rows) == {"good", "broken"} and "error" not in rows["good"], what
        try:
            s = Session.open("broken", home)
        except UserInputError as err_:
            assert str(err_).startswith("session broken: session.json"), what
        else:  # whatever still opens works for the library's readers and writers too
            s.summary()
            s.checkpoints()
            s.clean()
    assert refused >= 30
    assert Session.open("good", home).summary()["name"] == "good" and good.path.is_dir()
    (broken.path / "session.json").write_text(json.dumps({**info, "checkpoints": [{"step": 1, "path": "../.."}]}))
    code, out, err = _cli(capsys, "--root", str(home), "session", "rm", "broken", "--yes")  # still removable
    assert code == 0 and list_sessions(home) == ["good"] and good.path.is_dir(), err


# ---------------------------------------------------------------- finding 10: lock break race

CONTENDER = r"""
import os, sys, time
from pathlib import Path
from fastsd.errors import SessionLockedError
from fastsd.locks import SessionLock

folder, me, trials = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for t in range(trials):
    go = folder.parent / f"go-{t}"
    while not go.exists():
        time.sleep(0.0005)
    result = "refused"
    try:
        with SessionLock(folder, heartbeat=0):
            try:  # only one holder can create this marker at a time
                fd = os.open(folder.parent / f"inside-{t}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
                time.sleep(0.03)
                os.unlink(folder.parent / f"inside-{t}")
                result = "held"
            except FileExistsError:
                result = "overlap"
    except SessionLockedError:
        pass
    (folder.parent / f"done-{t}-{me}").write_text(result)
"""


def test_eight_contenders_breaking_a_dead_lock_never_hold_it_together(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    n, trials = 8, 15
    procs = [
        subprocess.Popen([sys.executable, "-c", CONTENDER, str(folder), str(i), str(trials)], env=ENV) for i in range(n)
    ]
    results = []
    try:
        for t in range(trials):
            now = time.time()
            record = {"pid": dead.pid, "host": socket.gethostname(), "since": now, "heartbeat": now, "token": f"d{t}"}
            (folder / LOCK_FILE).write_text(json.dumps(record))
            (tmp_path / f"go-{t}").touch()
            deadline = time.monotonic() + 30
            while len(list(tmp_path.glob(f"done-{t}-*"))) < n:
                assert time.monotonic() < deadline, "contenders hang"
                time.sleep(0.005)
            results.append(sorted(p.read_text() for p in tmp_path.glob(f"done-{t}-*")))
            assert read_lock(folder) is None  # the last holder released it
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [r for r in results if "overlap" in r] == []
    assert all("held" in r for r in results)  # the dead lock was broken every time


# ---------------------------------------------------------------- finding 2: training holds the lock


def test_a_running_training_refuses_a_second_training_and_rm(home, tiny_sd1, tmp_path, capsys):
    from train_helpers import square_session

    s = square_session(home, tiny_sd1, "busy")
    before = _tree(tmp_path, skip=(s.path,))
    trainer = subprocess.Popen(
        [sys.executable, "-m", "fastsd", "--root", str(home), "train", "busy", "--method", "lora",
         "--steps", "100000", "--resolution", "64", "--allow-resolution", "--save-every", "100000",
         "--no-export", "--log-every", "100000"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ((rec := read_lock(s.path)) and rec.get("command") == "fastsd train"):
            assert trainer.poll() is None, trainer.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the trainer never took the lock"
            time.sleep(0.1)
        want = f"fastsd: error: session busy is in use by fastsd train (pid {trainer.pid} on {socket.gethostname()}, since "
        args = ["--method", "lora", "--steps", "2", "--resolution", "64", "--allow-resolution", "--no-export"]
        code, _, err = _cli(capsys, "--root", str(home), "train", "busy", *args)
        assert code == 1 and err.startswith(want), err
        assert err.rstrip().endswith("; wait, or pass --force if that process is dead")
        code, _, err = _cli(capsys, "--root", str(home), "session", "rm", "busy", "--yes")
        assert code == 1 and err.startswith(want), err
        photos = tmp_path / "more"
        _photo(photos / "x.jpg", 9)
        code, _, err = _cli(capsys, "--root", str(home), "session", "add", "busy", str(photos))
        assert code == 1 and err.startswith(want), err
        with pytest.raises(SessionLockedError):
            Session.open("busy", home).set_caption("img0.png", "a caption edit while training")
        assert trainer.poll() is None and s.path.is_dir() and len(Session.open("busy", home).images()) == 2
        assert not (s.captions_dir / "img0.txt").exists()
        trainer.send_signal(signal.SIGINT)  # stops at the next step and saves its state
        assert trainer.wait(timeout=120) == 130, trainer.stderr.read()[-2000:]
    finally:
        trainer.kill()
        trainer.wait()
    assert read_lock(s.path) is None  # released on the way out
    code, _, err = _cli(capsys, "--root", str(home), "train", "busy", *args)  # the session is free again
    assert code == 0, err
    done = Session.open("busy", home)
    assert done.latest_checkpoint()["step"] == 2 and done.verify_checkpoint(done.latest_checkpoint())
    assert _tree(tmp_path, skip=(s.path, photos)) == before


# ---------------------------------------------------------------- finding 3: killed adds never duplicate

ADDER = r"""
import sys
from fastsd.session import Session
Session.open(sys.argv[2], sys.argv[1]).add_images(sys.argv[3], crop="center", progress=False)
"""


def test_killed_adds_rerun_give_each_photo_once(home, tmp_path, capsys):
    photos = tmp_path / "photos"
    for i in range(30):
        _photo(photos / f"p{i:02d}.jpg", i)
        (photos / f"p{i:02d}.txt").write_text(f"photo number {i}")
    s = Session.create("dog", home)
    before = _tree(tmp_path, skip=(s.path,))
    rng = random.Random(3)
    kills = 0
    for _ in range(8):
        have = len(s.images())
        if have >= 29:
            break
        target = rng.randint(have + 1, min(have + 8, 29))
        proc = subprocess.Popen([sys.executable, "-c", ADDER, str(home), "dog", str(photos)], env=ENV)
        deadline = time.monotonic() + 60
        while len(list(s.instance_dir.glob("*.png"))) < target and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(rng.random() * 0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 3
    code, out, err = _cli(capsys, "--root", str(home), "session", "add", "dog", str(photos), "--crop", "center")
    assert code == 0, err
    done = Session.open("dog", home)
    assert len(done.images()) == 30, out
    sources = sorted(Path(rec["source"]).name for rec in done.info["images"].values())
    assert sources == sorted(f"p{i:02d}.jpg" for i in range(30))
    assert done.captions() == {f"p{i:02d}.png": f"photo number {i}" for i in range(30)}
    assert _tree(tmp_path, skip=(s.path,)) == before  # the photos themselves are untouched


# ---------------------------------------------------------------- finding 4: leftovers

WRITER = r"""
import sys, time
from fastsd import storage
def produce(fh):
    fh.write(b"x" * 1_000_000)
    fh.flush()
    print("writing", flush=True)
    time.sleep(60)
storage.write_stream(sys.argv[1], produce)
"""


def _killed_writer(target: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()


def test_a_write_cleans_the_leftovers_of_killed_writes_of_the_same_target(tmp_path):
    target = tmp_path / "out" / "model.safetensors"
    for _ in range(4):  # each new write of the target starts by removing the last one's leftover
        _killed_writer(target)
        assert len(list(target.parent.glob(".fastsd-tmp-*"))) == 1
    legacy = target.parent / f"{storage.TEMP_PREFIX}0123456789ab-model.safetensors"  # older naming, 2 h old
    legacy.write_bytes(b"x" * 1000)
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    neighbour = target.parent / f"{storage.TEMP_PREFIX}0123456789ab-other.safetensors"
    neighbour.write_bytes(b"another target's write")
    live = storage.temp_name(target)  # a write of this (live) process that is still going on
    live.write_bytes(b"in progress")
    storage.write_bytes(target, b"done")
    assert target.read_bytes() == b"done"
    assert sorted(p.name for p in target.parent.glob(".fastsd-tmp-*")) == sorted([neighbour.name, live.name])


def test_show_reports_leftovers_and_the_next_writer_removes_them(home, tmp_path, capsys):
    s = Session.create("left", home)
    for name in ("session.json", "checkpoints/step-000100"):
        _killed_writer(s.path / name)
    staged = storage.temp_name(s.checkpoints_dir / "step-000200")  # a checkpoint copy killed midway
    staged.mkdir()
    (staged / "weights.bin").write_bytes(b"w" * 500_000)
    # a leftover named by a process of this host that is gone: owner pid of a finished process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = staged.with_name(staged.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    staged.rename(gone)
    code, out, _ = _cli(capsys, "--root", str(home), "session", "show", "left")
    assert code == 0 and "leftovers    2.4 MiB reclaimable in 3 leftover(s) of interrupted writes" in out, out
    summary = s.summary()
    assert summary["reclaimable"]["items"] == 3 and summary["reclaimable"]["bytes"] >= 2_500_000
    with s.lock(command="fastsd train"):  # opening the session for writing cleans them
        assert list(s.path.rglob(".fastsd-tmp-*")) == []
    assert Session.open("left", home).reclaimable() == {"bytes": 0, "items": 0}


def test_lock_taken_by_a_writer_keeps_temps_of_live_processes(home):
    s = Session.create("live", home)
    mine = storage.temp_name(s.path / "session.json")
    mine.write_bytes(b"a write of this very process")
    with SessionLock(s.path, on_acquire=lambda lock: s.clean(older_than=lock.since), heartbeat=0):
        pass
    assert mine.exists()


def test_training_saves_write_nothing_outside_the_session(home, tmp_path, monkeypatch):
    """A state goes straight into the session: no scratch copy that a killed run could leave behind."""
    import tempfile

    import torch

    from fastsd.train import checkpoint

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    s = Session.create("scratch", home)
    with s.lock():
        entry = checkpoint.save_to_session(
            s, 10, 2, weights={"w": torch.zeros(3)}, optimizer={}, state={"step": 10}, noise_gen=torch.Generator()
        )
    assert entry["step"] == 10 and s.verify_checkpoint(entry)
    assert list((tmp_path / "scratch").iterdir()) == []
