"""``fastsd session ...`` end to end on a temp root."""

from __future__ import annotations

import json
import zipfile

from PIL import Image, ImageDraw


def _photos(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (x, color) in enumerate([(150, (220, 20, 20)), (650, (20, 20, 220)), (400, (20, 180, 20))]):
        img = Image.new("RGB", (900, 600), (128, 128, 128))
        ImageDraw.Draw(img).ellipse((x - 80, 220, x + 80, 380), fill=color)
        img.save(folder / f"zwx_dog ({i + 1}).jpg", quality=90)
    (folder / "zwx_dog (1).txt").write_text("zwx dog on a grey wall")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


def test_session_commands_end_to_end(cli, tmp_path):
    root = str(tmp_path / "home")
    r = cli("session", "new", "my dog", "--base-model", "sd15", "--class", "dog", "--token", "zwx", "--root", root)
    assert r.returncode == 0, r.stderr
    assert "created session my_dog" in r.stdout

    r = cli(
        "session",
        "add",
        "my_dog",
        str(_photos(tmp_path / "photos")),
        "--crop",
        "center",
        "--size",
        "576",
        "--root",
        root,
    )
    assert r.returncode == 0, r.stderr
    assert "added 3 image(s), skipped 0 duplicate(s), 1 file(s) failed" in r.stdout
    assert "broken.png" in r.stdout

    r = cli("session", "list", "--root", root)
    assert r.returncode == 0 and "my_dog" in r.stdout and "3 images" in r.stdout

    r = cli("session", "show", "my_dog", "--root", root)
    assert r.returncode == 0, r.stderr
    assert "base model   sd15" in r.stdout
    assert '3 instance image(s): 1 with their own caption, 2 captioned "zwx dog"' in r.stdout
    assert "training     not started" in r.stdout

    r = cli("session", "show", "my_dog", "--json", "--root", root)
    data = json.loads(r.stdout)
    assert data["images"] == 3 and data["resolution"] == 512 and data["lock"] is None
    img = next((tmp_path / "home" / "sessions" / "my_dog" / "instance_images").iterdir())
    assert Image.open(img).size == (576, 576)

    # import a zip of it under another name, then remove both
    archive = tmp_path / "shared.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in (tmp_path / "home" / "sessions" / "my_dog").rglob("*"):
            if f.is_file():
                z.write(f, "my_dog/" + f.relative_to(tmp_path / "home" / "sessions" / "my_dog").as_posix())
    r = cli("session", "import", str(archive), "--root", root)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = cli("session", "import", str(archive), "--name", "friend_dog", "--root", root)
    assert r.returncode == 0, r.stderr
    assert "imported session friend_dog" in r.stdout and "3 instance image(s)" in r.stdout

    r = cli("session", "rm", "friend_dog", "--root", root)  # stdin is not a terminal here
    assert r.returncode == 2 and "pass --yes" in r.stderr
    assert (tmp_path / "home" / "sessions" / "friend_dog").is_dir()
    r = cli("session", "rm", "friend_dog", "--yes", "--root", root)
    assert r.returncode == 0 and "removed session friend_dog" in r.stdout
    r = cli("session", "list", "--root", root)
    assert "friend_dog" not in r.stdout and "my_dog" in r.stdout


def test_session_cli_bad_input(cli, tmp_path):
    root = str(tmp_path / "home")
    r = cli("session", "new", "../evil", "--root", root)
    assert r.returncode == 2 and "fastsd: error: session name '../evil' is not allowed" in r.stderr
    r = cli("session", "new", "ok", "--resolution", "700", "--root", root)
    assert r.returncode == 2 and "multiple of 64" in r.stderr
    r = cli("session", "show", "nope", "--root", root)
    assert r.returncode == 2 and "no session named nope" in r.stderr
    assert cli("session", "new", "ok", "--root", root).returncode == 0
    (tmp_path / "empty").mkdir()
    r = cli("session", "add", "ok", str(tmp_path / "empty"), "--root", root)
    assert r.returncode == 2 and "no images found" in r.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"nope")
    r = cli("session", "add", "ok", str(tmp_path / "bad"), "--root", root)
    assert r.returncode == 1 and "x.jpg: not an image" in r.stdout
    r = cli("session", "list", "--json", "--root", root)
    assert json.loads(r.stdout)[0]["name"] == "ok"
    r = cli("session", "rm", "ok", "--root", root, input="y\n")  # piped input is not a terminal: still refused
    assert r.returncode == 2


def test_session_cli_lock_message_and_force(cli, tmp_path):
    root = tmp_path / "home"
    assert cli("session", "new", "busy", "--root", str(root)).returncode == 0
    (root / "sessions" / "busy" / ".fastsd-lock.json").write_text(
        json.dumps({"pid": 999, "host": "colab-abc", "since": 0, "heartbeat": 9e12, "token": "t"})
    )
    _photos(tmp_path / "p")
    r = cli("session", "add", "busy", str(tmp_path / "p"), "--root", str(root))
    assert r.returncode == 1 and "session busy is in use by another process (pid 999 on colab-abc, since " in r.stderr
    r = cli("session", "show", "busy", "--root", str(root))
    assert "lock         in use: pid 999 on host colab-abc" in r.stdout
    r = cli("session", "add", "busy", str(tmp_path / "p"), "--force", "--root", str(root))
    assert r.returncode == 0 and "added 3 image(s)" in r.stdout
    r = cli("session", "rm", "busy", "--yes", "--root", str(root))
    assert r.returncode == 0


def test_rm_asks_in_a_terminal(tmp_path):
    """With a terminal on stdin, rm asks; anything but y/yes keeps the session (exit 2)."""
    import os
    import pty
    import subprocess
    import sys

    from conftest import REPO

    root = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-m", "fastsd", "session", "new", "asked", "--root", str(root)], env=env, check=True
    )

    def rm(answer: str) -> subprocess.CompletedProcess:
        master, slave = pty.openpty()
        try:
            os.write(master, answer.encode())
            return subprocess.run(
                [sys.executable, "-m", "fastsd", "session", "rm", "asked", "--root", str(root)],
                stdin=slave,
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
        finally:
            os.close(master)
            os.close(slave)

    r = rm("n\n")
    assert r.returncode == 2 and "delete session asked" in r.stdout and "not removed" in r.stdout
    assert (root / "sessions" / "asked").is_dir()
    r = rm("y\n")
    assert r.returncode == 0 and "removed session asked" in r.stdout
    assert not (root / "sessions" / "asked").exists()


def test_show_says_what_each_checkpoint_and_export_takes_and_what_fits_in_free_drive(cli, tmp_path):
    from fastsd.session import Session

    root = tmp_path / "home"
    s = Session.create("big", root, base_model="sd15")
    state = tmp_path / "state"
    state.mkdir()
    (state / "optimizer.pt").write_bytes(b"\0" * 6 * 2**20)
    s.record_checkpoint(500, state)
    export = s.models_dir / "big-step-500.safetensors"
    export.write_bytes(b"\0" * 2 * 2**20)
    s.record_model(export, kind="full", step=500)

    r = cli("session", "show", "big", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "each checkpoint 6.0 MiB; each export 2.0 MiB; 8.0 MiB in use" in r.stdout
    assert "15 GB of free Drive holds more than 50 checkpoint(s)" in r.stdout
    space = json.loads(cli("session", "show", "big", "--json", "--root", str(root)).stdout)["space"]
    assert space["checkpoint_bytes"] == 6 * 2**20 and space["export_bytes"] == 2 * 2**20


def test_space_plan_for_full_sd15_states_on_free_drive():
    """Measured sizes: a fused-AdamW SD1.5 state (10.3 GB) cannot be saved next to a 2.1 GB export
    in 15 GB; a 4 GB state can be kept twice (a save needs room for one more)."""
    from fastsd.session import space_plan

    export = [{"size": 2_130_000_000}]
    big = space_plan([{"bytes": 10_300_000_000}], export)
    assert big["checkpoints_that_fit"] == 0 and "cannot hold a checkpoint save" in big["text"]
    small = space_plan([{"bytes": 4_000_000_000}], export)
    assert small["checkpoints_that_fit"] == 2 and "holds 2 checkpoint(s) (--keep) plus one export" in small["text"]
    # a T4 full fine-tune's 3.71 GB state with no export yet: the export's room is not known, and the text says so
    first = space_plan([{"bytes": 3_710_000_000}], [])
    assert first["checkpoints_that_fit"] == 3 and "before any export (none made yet)" in first["text"]


def test_an_sdxl_session_trains_and_crops_at_1024_unless_told(cli, tmp_path, tiny_sdxl, tiny_sd1):
    """session new without --resolution: the base model's native size, for cropping and training alike."""
    from fastsd.session import Session
    from fastsd.train.config import TrainConfig, resolve

    root = str(tmp_path / "home")
    photo = tmp_path / "dog.png"
    Image.new("RGB", (1200, 1200), (90, 60, 30)).save(photo)
    assert cli("session", "new", "xl", "--base-model", str(tiny_sdxl), "--root", root).returncode == 0
    assert cli("session", "add", "xl", str(photo), "--root", root).returncode == 0
    r = cli("session", "show", "xl", "--root", root)
    assert "training size 1024 (the base model's native size)" in r.stdout, r.stdout
    assert json.loads(cli("session", "show", "xl", "--json", "--root", root).stdout)["resolution"] == 1024
    with Image.open(next((tmp_path / "home" / "sessions" / "xl" / "instance_images").iterdir())) as img:
        assert img.size == (1024, 1024)  # cropped at SDXL's size, not 512
    c, _ = resolve(TrainConfig(method="lora"), session_info=Session.open("xl", root).info, gpu_list=[])
    assert c.resolution == 1024  # what `fastsd train xl` trains at

    # a size the user set is kept, and an SD1.5 session stays at 512
    assert cli("session", "new", "sd", "--base-model", str(tiny_sd1), "--root", root).returncode == 0
    assert "training size 512 (the base model's native size)" in cli("session", "show", "sd", "--root", root).stdout
    assert (
        cli("session", "new", "xl768", "--base-model", str(tiny_sdxl), "--resolution", "768", "--root", root).returncode
        == 0
    )
    assert "training size 768\n" in cli("session", "show", "xl768", "--root", root).stdout
