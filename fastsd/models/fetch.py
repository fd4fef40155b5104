"""Get a model from wherever the user has it: registry name, Hub, Civitai, Google Drive, any URL, a path.

Hub downloads go through huggingface_hub (its cache, resume and checksums). Everything else is a
resumable HTTP download: the partial file lives on local disk (``cache_dir()/downloads``) under a
name derived from the URL, so a second ``get`` after a cut continues with a ``Range`` request; the
finished file is checked against the sha256 the source publishes (Civitai does; a direct URL may
carry ``#sha256=HEX``) and only then moved or safely copied under its final name. Tokens come from
``HF_TOKEN`` / ``CIVITAI_TOKEN`` or the Colab secrets of the same names and never appear in logs or
messages. Downloaded ``.ckpt``/``.pt`` files are opened with ``torch.load(weights_only=True)``
before they are kept: a pickle that needs code execution is refused and deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from ..colab import secret
from ..errors import ModelFormatError, NetworkError, UserInputError
from ..paths import cache_dir, fastsd_home
from ..redact import mask as redact
from ..storage import TEMP_PREFIX, copy_file, sha256_file
from .registry import BASE_MODELS, HELPER_MODELS, UrlFile, base_model

log = logging.getLogger(__name__)

#: What a Diffusers repo needs; root-level single files (several GB each) and pickles are skipped.
DIFFUSERS_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/*",
    "tokenizer*/*",
    "*/diffusion_pytorch_model.safetensors",
    "*/diffusion_pytorch_model-*.safetensors",
    "*/diffusion_pytorch_model.safetensors.index.json",
    "*/model.safetensors",
    "*/model-*.safetensors",
    "*/model.safetensors.index.json",
    "*/preprocessor_config.json",
]
PICKLES = (".ckpt", ".pt", ".pth", ".bin")
_HUB_FILE = re.compile(r"https?://huggingface\.co/([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+)")
_CIVITAI = re.compile(r"https?://(?:www\.)?civitai\.com/(?:models/(\d+)|api/download/models/(\d+))")
_DRIVE = re.compile(r"https?://(?:drive|docs)\.google\.com/")


def _models_dir(home: str | os.PathLike[str] | None) -> Path:
    return fastsd_home(home) / "models"


# --- Hub -------------------------------------------------------------------------------------


#: Seconds to wait for the Hub's first answer. One call, no retries: without a network the first
#: Hub call fails at once instead of after the Hub client's five retries (25 s).
HUB_PROBE_TIMEOUT = 10.0
HUB_URL = "https://huggingface.co"


def hub_unreachable(path: str | os.PathLike[str]) -> NetworkError:
    """The one line for "the Hub cannot be reached", with where to put the model instead."""
    return NetworkError(
        f"cannot reach the Hugging Face Hub (no network). Put the model at {path} and pass --model {path}, "
        "or set HF_HUB_OFFLINE=1 to use the cache"
    )


def is_connection_failure(err: BaseException) -> bool:
    """Whether ``err`` means the network (DNS, connect, TLS, timeout) failed, not the server's answer.

    The Hub client raises its HTTP library's transport errors (``httpx`` or ``httpx2``, by version),
    ``requests``-style ``ConnectionError`` or plain socket errors; they are recognised by kind and
    name, so any of these libraries' versions is covered without importing them.
    """
    import socket

    if isinstance(err, (socket.gaierror, socket.timeout, ConnectionError)):
        return True
    for cls in type(err).__mro__:
        if cls.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3") and cls.__name__ in (
            "TransportError",
            "ConnectionError",
            "NewConnectionError",
        ):
            return True
    return False


def connection_failure_message(err: BaseException) -> str | None:
    """One line for a network failure that reached the CLI unmapped, or None when ``err`` is not one.

    Names the host when the error carries its request, and the Hub's advice when it is the Hub.
    """
    if not is_connection_failure(err):
        return None
    try:
        host = urlparse(str(err.request.url)).hostname  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError when no request is attached
        host = None
    hub = urlparse(os.environ.get("HF_ENDPOINT") or HUB_URL).hostname
    if host is None or host == hub:
        return (
            "cannot reach the Hugging Face Hub (no network). Put the model in a local folder and pass "
            "--model PATH, or set HF_HUB_OFFLINE=1 to use the cache"
        )
    return f"cannot reach {host} ({type(err).__name__}: {redact(str(err))[:120]}); check the network and try again"


def _hub_error(err: Exception, what: str, repo: str, path: str | os.PathLike[str]) -> Exception | None:
    """The one-line fastsd error for a failed Hub call (the Hub client raises many kinds).

    Returns None for an exception that is no Hub or network failure (a bug), to be raised as it is.
    """
    import huggingface_hub.constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    if isinstance(err, GatedRepoError):
        page = f"{HUB_URL}/{repo}"
        if secret("HF_TOKEN"):
            return UserInputError(
                f"{what} is gated and HF_TOKEN's account has not been granted access: accept the licence at "
                f"{page} while logged in as that account, then run again"
            )
        return UserInputError(
            f"{what} is gated: accept its licence at {page} (logged in), then set HF_TOKEN "
            "(environment variable, or the Colab secret HF_TOKEN) to a token of that account"
        )
    if isinstance(err, RepositoryNotFoundError):
        return UserInputError(f"{what} does not exist on the Hub (or is private: set HF_TOKEN); check the name")
    if isinstance(err, OfflineModeIsEnabled) or (
        isinstance(err, LocalEntryNotFoundError) and huggingface_hub.constants.HF_HUB_OFFLINE
    ):
        return NetworkError(
            f"cannot download {what}: HF_HUB_OFFLINE is set and it is not in the cache; "
            f"put the model at {path} and pass --model {path}, or unset HF_HUB_OFFLINE"
        )
    if is_connection_failure(err):
        return hub_unreachable(path)
    if not isinstance(err, (OSError, ValueError)):
        return None
    return NetworkError(
        f"could not download {what} from the Hub ({type(err).__name__}: {redact(str(err))[:120]}); "
        "check the network and try again (downloads resume)"
    )


def _hub_files(repo: str, revision: str | None, token: str | None) -> list[str]:
    """The repo's file names, in one Hub call without retries (the reachability check)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, revision=revision, token=token, timeout=HUB_PROBE_TIMEOUT)
    return [s.rfilename for s in info.siblings or []]


def hub_repo_offline(repo: str, path: str | os.PathLike[str]) -> bool:
    """Check a Hub repo another library will download (transformers' ``from_pretrained``) before it does.

    One call without retries: a gated, missing or unreachable repo fails now with fastsd's line
    instead of after the Hub client's retries. When the Hub cannot be reached but the repo is in
    the Hub cache, returns True: load it with ``local_files_only=True``. ``path`` is where the
    message tells the user to put the model.

    Raises:
        UserInputError: gated or missing repo, or a path that does not exist (``/content/ocr``).
        NetworkError: the Hub cannot be reached and the repo is not cached.
    """
    import huggingface_hub.constants
    from huggingface_hub import snapshot_download

    if repo.startswith(("/", ".", "~")) or "\\" in repo or repo.count("/") > 1:
        raise UserInputError(f"{repo}: no such file or folder (and not a Hub repo id like org/name): check the path")
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return True
    try:
        _hub_files(repo, None, secret("HF_TOKEN"))
        return False
    except Exception as err:  # noqa: BLE001 - every Hub client failure becomes one fastsd line
        mapped = _hub_error(err, repo, repo, path)
        if mapped is None:
            raise
        if is_connection_failure(err):
            try:
                snapshot_download(repo, local_files_only=True)
                return True
            except Exception:  # noqa: BLE001 - not cached: the network message is the one that helps
                pass
        raise mapped from None


def _from_cache(repo: str, revision: str | None, dest: Path) -> Path:
    """With ``HF_HUB_OFFLINE=1``: the model already in ``dest`` or in the Hub cache, never the network."""
    from huggingface_hub import snapshot_download

    if (dest / "model_index.json").is_file() or any(dest.glob("*.safetensors")):
        return dest
    return Path(snapshot_download(repo, revision=revision, local_files_only=True))


def _hub_snapshot(repo: str, revision: str | None, dest: Path) -> Path:
    import huggingface_hub.constants
    from huggingface_hub import snapshot_download

    token = secret("HF_TOKEN")
    try:
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            return _from_cache(repo, revision, dest)
        files = _hub_files(repo, revision, token)
        if "model_index.json" in files:
            patterns: list[str] | None = DIFFUSERS_PATTERNS
        elif any(f.endswith(".safetensors") for f in files):
            patterns = ["*.safetensors", "*.json", "*.txt", "*.yaml", "*.jinja"]  # jinja: chat templates of VLMs
        else:
            patterns = None
        path = snapshot_download(repo, revision=revision, local_dir=dest, allow_patterns=patterns, token=token)
    except Exception as err:  # noqa: BLE001 - every Hub client failure becomes one fastsd line
        mapped = _hub_error(err, repo, repo, dest)
        if mapped is None:
            raise
        raise mapped from None
    return Path(path)


def _hub_file(repo: str, revision: str, filename: str, dest: Path) -> Path:
    import huggingface_hub.constants
    from huggingface_hub import hf_hub_download

    token = secret("HF_TOKEN")
    try:
        if not huggingface_hub.constants.HF_HUB_OFFLINE:
            _hub_files(repo, revision, token)
        path = hf_hub_download(repo, filename, revision=revision, local_dir=dest, token=token)
    except Exception as err:  # noqa: BLE001 - every Hub client failure becomes one fastsd line
        mapped = _hub_error(err, f"{repo}/{filename}", repo, dest / Path(filename).name)
        if mapped is None:
            raise
        raise mapped from None
    return Path(path)


# --- plain HTTP ------------------------------------------------------------------------------


def _filename_from(response: Any, url: str) -> str:
    disposition = response.headers.get("content-disposition", "")
    m = re.search(r"filename\*=UTF-8''([^;]+)", disposition) or re.search(r'filename="?([^";]+)"?', disposition)
    name = unquote(m.group(1)) if m else unquote(Path(urlparse(url).path).name)
    name = Path(name).name
    if not name or name in (".", ".."):
        name = "download"
    return name


def download(
    url: str,
    dest_dir: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    filename: str | None = None,
    headers: dict[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` into ``dest_dir``, resuming an interrupted earlier attempt, checking ``sha256``.

    Args:
        url: an http(s) URL (may contain a token; it is never logged).
        dest_dir: the folder the file ends up in.
        sha256: the expected hex digest; the download is refused (and removed) when it differs.
        filename: the name to keep; default from Content-Disposition or the URL path.
        headers: extra request headers (e.g. ``Authorization``).
        progress: show a tqdm progress bar.

    Returns:
        The final path.

    Raises:
        NetworkError: the server could not be reached or answered with an error.
        ModelFormatError: the sha256 does not match.
    """
    import httpx
    from tqdm.auto import tqdm

    key = hashlib.sha256(url.split("#")[0].encode()).hexdigest()[:16]
    partial_dir = cache_dir() / "downloads"
    partial_dir.mkdir(parents=True, exist_ok=True)
    partial = partial_dir / f"{TEMP_PREFIX}part-{key}"
    have = partial.stat().st_size if partial.exists() else 0
    req_headers = {"User-Agent": "fastsd", **(headers or {})}
    if have:
        req_headers["Range"] = f"bytes={have}-"
    try:
        with httpx.stream("GET", url, headers=req_headers, follow_redirects=True, timeout=60) as r:
            if r.status_code == 416:  # already complete
                name = filename or _filename_from(r, str(r.url))
            else:
                if r.status_code >= 400:
                    raise NetworkError(f"{redact(url)} answered HTTP {r.status_code}; check the link and any token")
                name = filename or _filename_from(r, str(r.url))
                resumed = r.status_code == 206 and have
                if not resumed:
                    have = 0
                total = int(r.headers.get("content-length", 0)) + have or None
                if resumed:
                    log.info("resuming %s at %d bytes", name, have)
                with (
                    open(partial, "ab" if resumed else "wb") as fh,
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=name, disable=not progress) as bar,
                ):
                    for chunk in r.iter_bytes():  # as it arrives: a cut keeps all received
                        fh.write(chunk)
                        bar.update(len(chunk))
                    fh.flush()
                    os.fsync(fh.fileno())
    except httpx.HTTPError as err:
        raise NetworkError(
            f"download of {redact(url)} was cut ({type(err).__name__}); run the same command again to resume"
        ) from None
    if sha256:
        got = sha256_file(partial)
        if got.lower() != sha256.lower():
            partial.unlink()
            raise ModelFormatError(
                f"{name}: sha256 {got[:12]}... does not match the published {sha256[:12]}...; "
                "the download was damaged or the file changed, try again"
            )
    final = Path(dest_dir) / name
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(partial, final)  # same file system: atomic
    except OSError:
        copy_file(partial, final, verify_sha256=True)  # e.g. local disk -> Drive
        partial.unlink()
    return final


def _civitai(url: str, dest: Path) -> Path:
    import httpx

    m = _CIVITAI.match(url)
    assert m
    query = parse_qs(urlparse(url).query)
    version = m.group(2) or (query.get("modelVersionId") or [None])[0]
    token = secret("CIVITAI_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    api = (
        f"https://civitai.com/api/v1/model-versions/{version}"
        if version
        else f"https://civitai.com/api/v1/models/{m.group(1)}"
    )
    try:
        info = httpx.get(api, headers=headers, timeout=30, follow_redirects=True).raise_for_status().json()
    except httpx.HTTPError as err:
        raise NetworkError(f"Civitai did not answer for {redact(url)} ({type(err).__name__}); try again") from None
    if "modelVersions" in info:
        info = info["modelVersions"][0]
    files = info.get("files") or []
    chosen = next((f for f in files if f.get("primary")), files[0] if files else None)
    if not chosen:
        raise UserInputError(f"Civitai lists no files for {redact(url)}")
    sha = (chosen.get("hashes") or {}).get("SHA256")
    return download(chosen["downloadUrl"], dest, sha256=sha, filename=chosen.get("name"), headers=headers)


def _drive(url: str, dest: Path) -> Path:
    m = re.search(r"/d/([\w-]+)", url) or re.search(r"[?&]id=([\w-]+)", url)
    if not m:
        raise UserInputError(f"{url} is not a Google Drive file share link (…/file/d/ID/… or …?id=ID)")
    direct = f"https://drive.usercontent.google.com/download?id={m.group(1)}&export=download&confirm=t"
    return download(direct, dest)


def _url_files(files: tuple[UrlFile, ...], dest: Path) -> Path:
    """A helper model published as plain-URL files, into one folder ``dest``; a file already there is kept.

    Each is downloaded once (resumable, sha256-checked, its pickle proven safe) and only then given
    its final name, so a file in ``dest`` passed those checks.
    """
    for f in files:
        if not (dest / f.name).is_file():
            _check_pickles(download(f.url, dest, sha256=f.sha256, filename=f.name), ours=True)
    return dest


def _check_pickles(path: Path, *, ours: bool) -> None:
    """Refuse a pickled model (or one inside a folder) that needs code execution to load.

    Every path :func:`get` returns goes through here, so nothing downstream ever opens a pickle
    that was not proven loadable with ``torch.load(weights_only=True)``. A refused file that
    fastsd downloaded or copied (``ours``) is deleted; the user's own file is left where it is.
    """
    from .tensorfile import load_pickle_state_dict

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in PICKLES)
    else:
        files = [path] if path.suffix.lower() in PICKLES else []
    for file in files:
        try:
            load_pickle_state_dict(file)
        except ModelFormatError:
            if ours and file == path:  # a single file fastsd fetched; a folder's other files stay usable
                file.unlink()
            raise


def check_spec(spec: str) -> str:
    """``spec`` as it should be stored (a local path made absolute), or a refusal; no network.

    What :func:`get` accepts: a registry name, ``hf:org/repo[@rev]``, an http(s) URL, or an existing
    path. A session stores its base model through this, so a typo is refused when it is typed,
    not minutes later when training starts, and a relative path still works from another folder.

    Raises:
        UserInputError: none of these (the message lists the known names).
    """
    spec = spec.strip()
    if spec in BASE_MODELS or spec in HELPER_MODELS or spec.startswith(("http://", "https://")):
        return spec
    if spec.startswith("hf:"):
        if spec[3:].partition("@")[0].count("/") != 1:
            raise UserInputError(f"{spec}: write a Hub repo as hf:org/name[@revision]")
        return spec
    local = Path(spec).expanduser()
    if not local.exists():
        raise UserInputError(
            f"{spec} is not a known model name ({', '.join(BASE_MODELS)}), a URL, hf:org/repo, or an existing path"
        )
    return str(local.resolve())


def get(
    spec: str,
    dest: str | os.PathLike[str] | None = None,
    home: str | os.PathLike[str] | None = None,
) -> Path:
    """Fetch the model ``spec`` and return where it is on disk.

    Args:
        spec: a registry name (``sd15``, ``sdxl``..., or a helper model: ``qwen3-vl-2b``, ``dino-vits16``,
            ``lpips-alex``), ``hf:org/repo[@rev]``, a Hub file URL
            (``https://huggingface.co/org/repo/resolve/rev/file``), a Civitai model or version URL, a
            Google Drive share link, any http(s) URL (``#sha256=HEX`` to check it), or a local path.
        dest: the folder to put it in (default ``<home>/models/``, a Hub repo in a subfolder).
        home: the fastsd home (default: the usual rule, see :func:`fastsd.paths.fastsd_home`).

    Returns:
        The file or Diffusers folder.

    Raises:
        UserInputError: an unknown name or a path that does not exist.
        NetworkError: the source could not be reached.
        ModelFormatError: checksum mismatch, or a pickle that needs code execution.

    Example:
        >>> get("sdxl")  # doctest: +SKIP
        PosixPath('/content/drive/MyDrive/fastsd/models/sdxl')
    """
    spec = spec.strip()
    target = Path(dest).expanduser() if dest else None
    if spec in BASE_MODELS:
        entry = base_model(spec)
        return _hub_snapshot(entry.repo, None, target or _models_dir(home) / spec)
    if spec in HELPER_MODELS:  # captioning and scoring models (qwen3-vl-2b, dino-vits16, clip-vit-b32, lpips-alex)
        helper = HELPER_MODELS[spec]
        if helper.files:
            return _url_files(helper.files, target or _models_dir(home) / spec)
        return _hub_snapshot(helper.repo_id, None, target or _models_dir(home) / spec)
    if spec.startswith("hf:"):
        check_spec(spec)
        repo, _, rev = spec[3:].partition("@")
        return _hub_snapshot(repo, rev or None, target or _models_dir(home) / repo.replace("/", "--"))
    if m := _HUB_FILE.match(spec):
        path = _hub_file(m.group(1), m.group(2), m.group(3).split("?")[0], target or _models_dir(home))
    elif _CIVITAI.match(spec):
        path = _civitai(spec, target or _models_dir(home))
    elif _DRIVE.match(spec):
        path = _drive(spec, target or _models_dir(home))
    elif spec.startswith(("http://", "https://")):
        url, _, frag = spec.partition("#")
        sha = frag[len("sha256=") :] if frag.startswith("sha256=") else None
        path = download(url, target or _models_dir(home), sha256=sha)
    else:
        local = Path(check_spec(spec))
        if target is None:
            path = local.resolve()
            _check_pickles(path, ours=False)
            return path
        out = target / local.name
        if local.is_dir():
            with contextlib.suppress(FileExistsError):
                shutil.copytree(local, out)
        else:
            copy_file(local, out, verify_sha256=True)
        path = out
    _check_pickles(path, ours=True)
    log.info("model ready: %s", path)
    return path
