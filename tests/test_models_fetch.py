"""fetch.get against local files and a local HTTP server (resume after a cut, sha256), registry, load_pipeline."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from fastsd.errors import ModelFormatError, NetworkError, UserInputError
from fastsd.models import registry
from fastsd.models.fetch import get, redact

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)


class _Handler(http.server.BaseHTTPRequestHandler):
    cut_once = True
    ranges: list[str] = []
    files: dict[str, bytes] = {}

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        body = self.files.get(self.path.split("?")[0])
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        rng = self.headers.get("Range")
        type(self).ranges.append(rng or "")
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body) - start))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if type(self).cut_once and not rng:
            type(self).cut_once = False
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-file
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSD_CACHE", str(tmp_path / "cache"))
    _Handler.cut_once, _Handler.ranges = True, []
    _Handler.files = {"/model.safetensors": PAYLOAD, "/evil.ckpt": b"", "/again.bin": PAYLOAD}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_resumes_after_a_cut_and_checks_sha256(server, tmp_path):
    url = f"{server}/model.safetensors#sha256={hashlib.sha256(PAYLOAD).hexdigest()}"
    with pytest.raises(NetworkError, match="resume"):
        get(url, dest=tmp_path / "models")
    assert not (tmp_path / "models" / "model.safetensors").exists()
    path = get(url, dest=tmp_path / "models")
    assert path == tmp_path / "models" / "model.safetensors"
    assert path.read_bytes() == PAYLOAD
    assert _Handler.ranges[-1] == f"bytes={len(PAYLOAD) // 3}-"  # continued, not restarted


def test_sha256_mismatch_is_refused_and_nothing_kept(server, tmp_path):
    _Handler.cut_once = False
    with pytest.raises(ModelFormatError, match="sha256"):
        get(f"{server}/model.safetensors#sha256={'0' * 64}", dest=tmp_path / "models")
    assert not list((tmp_path / "models").glob("*")) if (tmp_path / "models").exists() else True
    assert not list((tmp_path / "cache").rglob("*part*"))


def test_pickle_needing_code_is_refused_after_download(server, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"x": Evil()}, evil)
    _Handler.files["/evil.ckpt"] = evil.read_bytes()
    _Handler.cut_once = False
    with pytest.raises(ModelFormatError, match="code execution"):
        get(f"{server}/evil.ckpt", dest=tmp_path / "models")
    assert not (tmp_path / "models" / "evil.ckpt").exists()


def test_local_paths_and_unknown_specs(tmp_path, home):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x" * 10)
    assert get(str(f)) == f.resolve()
    copied = get(str(f), dest=tmp_path / "elsewhere")
    assert copied.read_bytes() == f.read_bytes()
    with pytest.raises(UserInputError, match="known model name"):
        get("sd99")
    with pytest.raises(UserInputError, match="hf:org/name"):
        get("hf:justaname")


def test_tokens_are_redacted(monkeypatch):
    from fastsd.colab import secret

    monkeypatch.setenv("CIVITAI_TOKEN", "sekrit-token-123")
    assert secret("CIVITAI_TOKEN") == "sekrit-token-123"  # reading a secret registers it for masking
    text = redact("https://civitai.com/api/download/models/1?token=sekrit-token-123 Bearer sekrit-token-123")
    assert "sekrit" not in text


def test_hub_failures_are_one_line_errors(home, monkeypatch):
    from fastsd.errors import NetworkError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NetworkError, match="HF_HUB_OFFLINE is set"):
        get("sd15", home=home)


def test_registry_tables():
    assert registry.base_model("sd15").repo == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert registry.base_model("sdxl").vae == "madebyollin/sdxl-vae-fp16-fix"
    assert registry.base_model("sd21-768").prediction_type == "v_prediction"
    assert {"sd15", "sd15-inpaint", "sd21-512", "sd21-768", "sdxl", "sd35-medium"} <= set(registry.BASE_MODELS)
    for family, marker in (("sd1", "sd15"), ("sd2", "sd21"), ("sdxl", "sdxl")):
        nets = registry.controlnets(family)
        assert nets and all(marker in (n.repo + (n.file or "")) for n in nets), family
    with pytest.raises(UserInputError):
        registry.base_model("nope")


def test_registry_override(monkeypatch):
    monkeypatch.setenv("FASTSD_REPO_SD21_768", "me/my-sd21")
    assert registry.base_model("sd21-768").repo == "me/my-sd21"


def test_load_pipeline_from_folder_and_single_file(tiny_sd1_inpaint, tiny_sd1, tmp_path):
    from fastsd.models.convert import diffusers_to_single_file
    from fastsd.models.load import load_pipeline

    pipe = load_pipeline(tiny_sd1_inpaint)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    file = diffusers_to_single_file(tiny_sd1, tmp_path / "m.safetensors")
    pipe = load_pipeline(file, pipeline="img2img", config=tiny_sd1)
    assert type(pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    ref = load_pipeline(Path(tiny_sd1))
    assert all(
        torch.equal(a, b) for a, b in zip(ref.unet.state_dict().values(), pipe.unet.state_dict().values(), strict=True)
    )


def test_cli_detect_json(tiny_sdxl, cli):
    import json

    r = cli("model", "detect", str(tiny_sdxl), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["family"] == "sdxl"


class _MarkerPickle:
    """Unpickling this creates a marker file: proof that a pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_cli_model_get_of_a_local_malicious_pickle_refuses_without_running_it(tmp_path, home, cli, writer):
    import pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": _MarkerPickle(marker)}}
    if writer == "pickle":
        evil.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, evil)
    for args in (("model", "get", str(evil)), ("model", "get", str(evil), "--dest", str(tmp_path / "d"))):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "needs code execution" in r.stderr and "Traceback" not in r.stderr
        assert r.stdout == ""  # no path printed for the caller to load
    assert not marker.exists()
    assert evil.is_file()  # the user's own file is left alone
    assert not (tmp_path / "d" / "evil.ckpt").exists()  # the copy fastsd made is gone


def test_model_get_checks_pickles_inside_a_local_folder(tmp_path, home):
    marker = tmp_path / "pwned"
    folder = tmp_path / "pipe" / "unet"
    folder.mkdir(parents=True)
    torch.save({"w": _MarkerPickle(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFormatError, match="code execution"):
        get(str(tmp_path / "pipe"))
    assert not marker.exists()


def test_helper_models_are_fetched_by_name_like_base_models(home, monkeypatch, tmp_path):
    from fastsd.errors import NetworkError
    from fastsd.models.fetch import check_spec
    from fastsd.models.registry import helper_spec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert check_spec("qwen3-vl-2b") == "qwen3-vl-2b"
    with pytest.raises(NetworkError, match="Qwen/Qwen3-VL-2B-Instruct"):
        get("qwen3-vl-2b", home=home)
    assert helper_spec("facebook/dino-vits16") == "hf:facebook/dino-vits16"
    monkeypatch.setenv("FASTSD_REPO_DINO_VITS16", str(tmp_path))  # an offline copy
    assert helper_spec("dino-vits16") == str(tmp_path)


def test_a_helper_model_of_plain_url_files_is_resumed_checked_and_kept(server, tmp_path, home, monkeypatch):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.arange(300_000.0)}, a)
    torch.save({"v": torch.ones(3)}, b)
    _Handler.files.update({"/x/a.pth": a.read_bytes(), "/y/b.pth": b.read_bytes()})
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)}
    files = (
        registry.UrlFile("first.pth", f"{server}/x/a.pth", sha["a.pth"]),
        registry.UrlFile("second.pth", f"{server}/y/b.pth", sha["b.pth"]),
    )
    monkeypatch.setitem(
        registry.HELPER_MODELS, "two-files", registry.HelperModel("two-files", "", "score", "MIT", files=files)
    )
    with pytest.raises(NetworkError, match="resume"):
        get("two-files", home=home)  # the first file is cut
    folder = get("two-files", home=home)
    assert folder == home / "models" / "two-files"
    assert (folder / "first.pth").read_bytes() == a.read_bytes() and (
        folder / "second.pth"
    ).read_bytes() == b.read_bytes()
    assert _Handler.ranges[-2].startswith("bytes=")  # the cut file continued
    requests = len(_Handler.ranges)
    assert get("two-files", home=home) == folder and len(_Handler.ranges) == requests  # kept: no download
    bad = (registry.UrlFile("third.pth", f"{server}/y/b.pth", "0" * 64),)
    monkeypatch.setitem(registry.HELPER_MODELS, "bad", registry.HelperModel("bad", "", "score", "MIT", files=bad))
    with pytest.raises(ModelFormatError, match="sha256"):
        get("bad", home=home)
    assert not (home / "models" / "bad" / "third.pth").exists()


def test_lpips_weights_are_a_registry_helper_of_url_files():
    from fastsd.models.fetch import check_spec

    entry = registry.HELPER_MODELS[registry.DEFAULT_LPIPS]
    assert check_spec("lpips-alex") == "lpips-alex" and entry.task == "score"
    assert {f.name for f in entry.files} == {"alexnet-owt-7be5be79.pth", "alex.pth"}
    for f in entry.files:  # torchvision's names carry the sha256's first 8 digits
        assert f.url.startswith("https://") and len(f.sha256) == 64 and f.url.endswith(f.name)
    assert next(f for f in entry.files if f.name.startswith("alexnet")).sha256.startswith("7be5be79")
