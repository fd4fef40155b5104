"""fastsd install: planning, locks, and installs from a local index and from the wheel cache offline."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import subprocess
import sys
import sysconfig
import threading
import venv
import zipfile
from pathlib import Path

import pytest

from fastsd.errors import UserInputError
from fastsd.install import Lock, Wheelhouse, parse_features, plan, unmet

REPO = Path(__file__).resolve().parent.parent


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """Write a minimal, valid pure-Python wheel by hand (a wheel is a zip with dist-info)."""
    mod = name.replace("-", "_")
    dist = f"{mod}-{version}.dist-info"
    files = {
        f"{mod}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: fastsd-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


class _Index:
    """A PEP 503 'simple' index on 127.0.0.1 serving the wheels in a folder."""

    def __init__(self, wheels: list[Path], root: Path) -> None:
        simple = root / "simple"
        for wheel in wheels:
            project = wheel.name.split("-")[0].replace("_", "-").lower()
            (simple / project).mkdir(parents=True, exist_ok=True)
            (simple / project / wheel.name).write_bytes(wheel.read_bytes())
            links = "".join(f'<a href="{w.name}">{w.name}</a>\n' for w in (simple / project).glob("*.whl"))
            (simple / project / "index.html").write_text(f"<html><body>{links}</body></html>")
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def _fresh_venv(path: Path) -> Path:
    """A new venv that sees the *test venv's* packages (torch, pip, uv), like Colab's Python sees its
    preinstalled torch, and nothing of the base interpreter's."""
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(path)
    python = path / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(own) / "test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


INSTALL_SCRIPT = """
import json, sys
import fastsd.features as features
features.FEATURES["train"] = ("test feature", ("fastsd-dummy>=1.0",))
from fastsd.errors import FastsdError
from fastsd.install import install
try:
    r = install("train", wheelhouse=sys.argv[1], installer=sys.argv[2])
except FastsdError as err:
    print("ERROR", type(err).__name__, err)
    raise SystemExit(err.exit_code)
print("REPORT", json.dumps({"source": r.source, "cached": r.cached, "changed": sorted(r.changed)}))
"""


def _run_install(python: Path, wheelhouse: Path, index_url: str, installer: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin:" + str(Path(sys.executable).parent),
        "HOME": str(wheelhouse.parent),
        "PYTHONPATH": str(REPO),
        "PIP_INDEX_URL": index_url,
        "PIP_CONFIG_FILE": "/dev/null",
        "UV_INDEX_URL": index_url,
        "UV_DEFAULT_INDEX": index_url,
        "UV_CACHE_DIR": str(wheelhouse.parent / "uv-cache"),
        "PIP_NO_CACHE_DIR": "1",
    }
    return subprocess.run(
        [str(python), "-c", INSTALL_SCRIPT, str(wheelhouse), installer],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _importable(python: Path) -> bool:
    return subprocess.run([str(python), "-c", "import fastsd_dummy"], capture_output=True).returncode == 0


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_cold_install_fills_cache_then_offline_install_from_it(tmp_path, installer):
    if installer == "uv":
        pytest.importorskip("uv")
    wheels = tmp_path / "built"
    wheels.mkdir()
    dep = make_wheel(wheels, "fastsd-dummy-dep", "2.0")
    top = make_wheel(wheels, "fastsd-dummy", "1.0", requires=("fastsd-dummy-dep>=2",))
    index = _Index([dep, top], tmp_path / "index")
    wheelhouse = tmp_path / "wheelhouse"
    try:
        first = _run_install(_fresh_venv(tmp_path / "venv1"), wheelhouse, index.url, installer)
    finally:
        index.close()
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads(first.stdout.split("REPORT ", 1)[1])
    assert report["source"] == "index"
    assert sorted(report["cached"]) == sorted([dep.name, top.name])
    assert "installed fastsd-dummy 1.0" in first.stdout and "installed fastsd-dummy-dep 2.0" in first.stdout

    # A new runtime with the same fingerprint and NO reachable index installs from the cache.
    python2 = _fresh_venv(tmp_path / "venv2")
    assert not _importable(python2)
    second = _run_install(python2, wheelhouse, "http://127.0.0.1:9/simple", installer)
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads(second.stdout.split("REPORT ", 1)[1])["source"] == "wheel cache"
    assert _importable(python2)


def test_damaged_cache_is_bypassed_not_fatal(tmp_path):
    wheels = tmp_path / "built"
    wheels.mkdir()
    good = make_wheel(wheels, "fastsd-dummy", "1.0")
    house = Wheelhouse(tmp_path / "wheelhouse")
    house.add([good], "fp")
    (tmp_path / "wheelhouse" / good.name).write_bytes(b"garbage")  # Drive truncated it
    index = _Index([good], tmp_path / "index")
    try:
        result = _run_install(_fresh_venv(tmp_path / "venv"), tmp_path / "wheelhouse", index.url, "pip")
    finally:
        index.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "damaged (sha256 mismatch)" in result.stdout
    assert '"source": "index"' in result.stdout


def test_no_network_and_no_cache_is_one_clear_failure(tmp_path):
    result = _run_install(_fresh_venv(tmp_path / "venv"), tmp_path / "wheelhouse", "http://127.0.0.1:9/simple", "pip")
    assert result.returncode == 1
    assert "ERROR NetworkError" in result.stdout and "--wheelhouse" in result.stdout
    assert "---- pip output ----" in result.stderr  # the installer's own output is shown, not swallowed
    assert "Traceback" not in result.stdout


def test_plan_lists_exactly_what_is_missing_or_too_old():
    installed = {"diffusers": "0.30.0", "transformers": "5.2.0", "accelerate": "1.2.0", "peft": "0.14.0"}
    installed |= {n: "99" for n in ("numpy", "safetensors", "huggingface-hub", "tqdm", "pillow", "psutil", "packaging")}
    items = {i.name: i for i in plan(["train"], installed)}
    assert items["diffusers"].installed == "0.30.0" and items["diffusers"].action == "upgrade"
    assert items["bitsandbytes"].action == "install"
    assert "accelerate" not in items and "transformers" not in items and "torch" not in items
    # Two features asking for one package give one line with both specifiers.
    merged = {i.name: i for i in plan(["train", "ocr"], {**installed, "transformers": "4.40.0"})}
    assert str(merged["transformers"].requirement.specifier) == "!=5.24.*,>=4.46,>=5.1"  # KNOWN_BAD excluded
    assert set(merged["transformers"].features) == {"train", "ocr"}


def test_unmet_skips_markers_that_do_not_apply():
    assert unmet(["nonexistent-pkg>=1; sys_platform == 'nonexistent'"], {}) == []
    assert [str(n.requirement) for n in unmet(["nonexistent-pkg>=1"], {})] == ["nonexistent-pkg>=1"]


def test_parse_features():
    assert parse_features("all") == ["train", "webui", "ocr"]
    assert parse_features("ocr, train") == ["ocr", "train"]
    with pytest.raises(UserInputError, match="unknown feature 'trian'"):
        parse_features("trian")


def test_lock_parsing_and_mismatch(tmp_path, cli):
    lock = tmp_path / "lock.txt"
    lock.write_text("# fingerprint: cp399-torch9.9.9-cu999\nbitsandbytes==0.50.2  # train\n")
    parsed = Lock.read(lock)
    assert parsed.fingerprint == "cp399-torch9.9.9-cu999" and parsed.pins == {"bitsandbytes": "0.50.2"}
    result = cli("install", "--features", "train", "--lock", str(lock))
    assert result.returncode == 2
    assert "is for cp399-torch9.9.9-cu999" in result.stderr and "Traceback" not in result.stderr
    lock.write_text("bitsandbytes>=0.4\n# fingerprint: x\n")
    with pytest.raises(UserInputError, match="pins exact versions"):
        Lock.read(lock)


def test_shipped_colab_lock_is_valid():
    from fastsd.install import LOCK_DIR

    locks = sorted(LOCK_DIR.glob("*.txt"))
    assert any(p.stem == "cp313-torch2.11.0-cu128" for p in locks)
    for path in locks:
        lock = Lock.read(path)
        assert lock.fingerprint == path.stem or (path.name == "tested.txt" and lock.tested_on)


def test_dry_run_cli_lists_missing(cli):
    result = cli("install", "--dry-run", "--features", "all")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines, "dry run printed nothing"
    assert all(line.startswith(("missing", "too old", "everything")) for line in lines)
