"""Packages that are each in range but broken together: doctor says "not ready", install moves them
to the tested set. The drift of 2026-11 (transformers 5.24.0 asking for a peft that did not exist) is
simulated with dist-info folders placed ahead of the real ones on sys.path."""

from __future__ import annotations

import os
from pathlib import Path

from fastsd import install
from fastsd.compat import Conflict, conflicts
from fastsd.install import Lock

REPO = Path(__file__).resolve().parent.parent


def fake_dist(site: Path, name: str, version: str, requires: tuple[str, ...] = (), files: dict | None = None) -> None:
    """A dist-info folder (and source files) that importlib.metadata finds before the real one."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    for rel, text in (files or {}).items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)


def drift_site(tmp_path: Path) -> Path:
    site = tmp_path / "drift-site"
    # No __init__.py: `import transformers` still finds the real package; only metadata and the
    # version constant are read from here, as the checker reads them.
    fake_dist(
        site,
        "transformers",
        "5.24.0",
        files={"transformers/integrations/peft.py": 'MIN_PEFT_VERSION = "0.22.0"\n'},
    )
    fake_dist(site, "peft", "0.21.2")
    return site


def _env(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}


def test_doctor_reports_the_drift_pair_as_not_ready(tmp_path, cli, home):
    result = cli("doctor", env=_env(drift_site(tmp_path)))
    assert result.returncode == 0, result.stderr
    lines = {ln.split(":", 1)[0].split()[-1]: ln for ln in result.stdout.splitlines() if ln.startswith("feature")}
    assert lines["train"] == (
        "feature  train: not ready: transformers 5.24.0 needs peft >= 0.22.0 (installed 0.21.2); "
        "run fastsd install --features train"
    )
    assert "not ready" in lines["ocr"] and "transformers" in lines["ocr"]


def test_install_moves_the_drift_pair_to_the_tested_versions(tmp_path, cli, home):
    result = cli("install", "--dry-run", "--features", "train", env=_env(drift_site(tmp_path)))
    assert result.returncode == 0, result.stderr
    pinned = install.tested_lock().pins["transformers"]
    assert (
        f"conflict  transformers 5.24.0 -> transformers=={pinned}: "
        "transformers 5.24.0 needs peft >= 0.22.0 (installed 0.21.2)  (train)"
    ) in result.stdout.splitlines()


def test_latest_says_untested_and_excludes_lock(tmp_path, cli, home):
    result = cli("install", "--dry-run", "--latest", "--features", "train")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("--latest: resolving the newest versions") and "untested" in result.stdout
    both = cli("install", "--latest", "--lock", str(REPO / "wheels" / "tested.txt"))
    assert both.returncode == 2 and "contradict" in both.stderr


def test_metadata_minimum_broken_is_a_conflict(tmp_path, monkeypatch):
    site = tmp_path / "site"
    fake_dist(site, "fastsd-a", "1.0", requires=("fastsd-b>=2.0", "fastsd-c>=1; extra == 'x'"))
    fake_dist(site, "fastsd-b", "1.5")
    fake_dist(site, "fastsd-c", "0.1")  # only an extra asks for c: not a conflict
    monkeypatch.syspath_prepend(str(site))
    assert conflicts(["fastsd-a", "fastsd-b", "fastsd-c"]) == [Conflict("fastsd-a", "1.0", "fastsd-b", ">=2.0", "1.5")]
    assert conflicts(["fastsd-a", "fastsd-c"]) == []  # b is not part of the set asked about


def test_doctor_tries_the_imports_a_feature_needs(tmp_path, cli, home):
    site = tmp_path / "broken-site"
    (site / "scipy").mkdir(parents=True)
    (site / "scipy" / "__init__.py").write_text("raise ImportError('libopenblas.so: cannot open shared object')\n")
    result = cli("doctor", env=_env(site))
    webui = next(ln for ln in result.stdout.splitlines() if ln.startswith("feature  webui"))
    assert "not ready" in webui and "libopenblas.so" in webui and webui.endswith("run fastsd install --features webui")


def test_tested_lock_pins_a_peft_that_transformers_accepts():
    lock = install.tested_lock()
    assert isinstance(lock, Lock) and lock.tested_on and "torch" not in lock.pins
    assert not any(name.startswith("nvidia-") for name in lock.pins)
    assert lock.pins["transformers"] != "5.24.0"


def test_no_extra_pulls_torch():
    # pip would resolve a CUDA build of several GB for any of these on a machine without torch.
    from packaging.requirements import Requirement

    from fastsd.features import CORE, FEATURES, TEST, requirements_for

    names = {Requirement(r).name for r in [*CORE, *TEST, *requirements_for(list(FEATURES))]}
    assert not names & {"torch", "torchvision", "torchaudio", "triton"}
