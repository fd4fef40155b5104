"""Make a local web UI reachable from the browser: Colab's proxy, ngrok, cloudflared, localtunnel.

:func:`open_tunnel` returns a :class:`Tunnel` whose public URL has already answered a request
(a tunnel that prints a dead URL is the most common complaint about Colab web UI notebooks).

- ``colab``: Colab's own port proxy (``google.colab.kernel.proxyPort``); no third party, only
  the notebook's Google account can open it. The default inside Colab.
- ``ngrok``: through pyngrok; token from the argument, ``NGROK_AUTHTOKEN`` or the Colab secret
  ``NGROK_AUTHTOKEN``; agents left by earlier runs are stopped first (a free account allows one,
  ERR_NGROK_108); ngrok's error codes become plain advice (:func:`ngrok_advice`). Basic auth is
  set on the tunnel when a login is given.
- ``cloudflared``: a quick tunnel (no account); the binary for this platform is fetched into the
  cache once and checked to run; the ``trycloudflare.com`` URL is read from its log.
- ``localtunnel``: ``npx localtunnel``; visitors must enter a tunnel password, which is this
  runtime's public IP address: it is printed with the URL.
- ``gradio`` (the built-in UI's share link) and ``none`` are handled by the caller; see
  :func:`needs_password`.

Tokens never appear in output: they are registered with :mod:`fastsd.redact`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import platform
import re
import secrets
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import storage
from ..errors import FastsdError, NetworkError, UserInputError
from ..paths import cache_dir
from ..redact import mask, register

KINDS = ("colab", "ngrok", "cloudflared", "localtunnel", "gradio", "none")
PUBLIC_KINDS = ("ngrok", "cloudflared", "localtunnel", "gradio")

CLOUDFLARED_URL = re.compile(r"https://[a-z0-9][a-z0-9-]*\.trycloudflare\.com")
LOCALTUNNEL_URL = re.compile(r"your url is:\s*(https://\S+)", re.IGNORECASE)
NGROK_URL = re.compile(r"url=(https://\S+)")

CLOUDFLARED_RELEASE = "https://github.com/cloudflare/cloudflared/releases/latest/download/"
#: (system, machine) -> release asset.
CLOUDFLARED_ASSETS = {
    ("Linux", "x86_64"): "cloudflared-linux-amd64",
    ("Linux", "aarch64"): "cloudflared-linux-arm64",
    ("Linux", "arm64"): "cloudflared-linux-arm64",
    ("Darwin", "x86_64"): "cloudflared-darwin-amd64.tgz",
    ("Darwin", "arm64"): "cloudflared-darwin-arm64.tgz",
    ("Windows", "AMD64"): "cloudflared-windows-amd64.exe",
}

#: ngrok error code -> plain advice.
NGROK_ERRORS = {
    "ERR_NGROK_108": "your ngrok account allows one agent at a time and another is still connected (an earlier "
    "runtime?): stop it at https://dashboard.ngrok.com/agents, wait a minute, and run again",
    "ERR_NGROK_4018": "ngrok needs a verified account and authtoken: sign up at https://dashboard.ngrok.com/signup, "
    "copy the token from https://dashboard.ngrok.com/get-started/your-authtoken and pass --ngrok-token "
    "(or set the Colab secret NGROK_AUTHTOKEN)",
    "ERR_NGROK_105": "the ngrok authtoken is malformed: copy it again from "
    "https://dashboard.ngrok.com/get-started/your-authtoken (the token, not the 'ngrok config' command)",
    "ERR_NGROK_107": "the ngrok authtoken is not valid (revoked or from another account): copy the current one "
    "from https://dashboard.ngrok.com/get-started/your-authtoken",
    "ERR_NGROK_334": "this ngrok endpoint is already online elsewhere: stop the other agent or use another domain",
    "ERR_NGROK_8012": "ngrok reached this runtime but the web UI did not answer: it crashed or is still starting",
    "ERR_NGROK_3200": "the ngrok endpoint is offline: the agent stopped; run fastsd webui again",
    "ERR_NGROK_6024": "ngrok shows free-plan visitors a warning page first: click 'Visit Site' once",
}


class TunnelError(FastsdError):
    """A tunnel could not be opened or its URL did not answer; the message says what to do."""


@dataclass
class Tunnel:
    """An open tunnel. Call :meth:`close` (or use ``with``) to end it."""

    kind: str
    url: str
    local_url: str
    note: str | None = None  # e.g. localtunnel's visitor password, or why the URL was not checked
    _close: Callable[[], None] | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._close is not None:
            with contextlib.suppress(Exception):
                self._close()
            self._close = None

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Output parsing (pure functions; tested against captured real output)


def parse_cloudflared_url(text: str) -> str | None:
    """The quick-tunnel URL in cloudflared's log, skipping ``api.trycloudflare.com``."""
    for match in CLOUDFLARED_URL.finditer(text):
        if not match.group(0).startswith("https://api."):
            return match.group(0)
    return None


def cloudflared_advice(text: str) -> str | None:
    """Plain advice for a cloudflared failure found in its log, or None."""
    if re.search(r"429 Too Many Requests|error code: 1015", text):
        return "Cloudflare is rate-limiting quick tunnels from this address: wait a few minutes or use --tunnel ngrok"
    if re.search(r"no such host|Temporary failure in name resolution|network is unreachable", text, re.I):
        return "cloudflared cannot reach Cloudflare: check the runtime's network"
    if "failed to request quick Tunnel" in text or "failed to unmarshal quick Tunnel" in text:
        return (
            "Cloudflare did not hand out a quick tunnel (service busy or unreachable): try again or use --tunnel ngrok"
        )
    return None


def parse_localtunnel_url(text: str) -> str | None:
    """The URL from ``npx localtunnel``'s ``your url is: https://...`` line."""
    match = LOCALTUNNEL_URL.search(text)
    return match.group(1) if match else None


def parse_ngrok_url(text: str) -> str | None:
    """The public URL from an ngrok agent log (``msg="started tunnel" ... url=https://...``)."""
    for line in text.splitlines():
        if "started tunnel" in line:
            match = NGROK_URL.search(line)
            if match:
                return match.group(1)
    return None


def ngrok_advice(message: str) -> str:
    """Plain advice for an ngrok error message (by its ``ERR_NGROK_*`` code), secrets masked."""
    for code, advice in NGROK_ERRORS.items():
        if code in message:
            return f"{advice} ({code})"
    if re.search(r"authentication failed|authtoken", message, re.I):
        return "ngrok refused the authtoken: check --ngrok-token / NGROK_AUTHTOKEN (" + _last_line(message) + ")"
    return "ngrok could not start: " + _last_line(message)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in mask(text).splitlines() if ln.strip()]
    return lines[-1] if lines else "no details"


# --------------------------------------------------------------------------------------------
# Helpers


def generate_auth(user: str = "fastsd") -> str:
    """A fresh ``user:password`` for a public tunnel that would otherwise be open to anyone."""
    value = f"{user}:{secrets.token_urlsafe(12)}"
    register(value)
    return value


def needs_password(kind: str) -> bool:
    """Whether ``kind`` exposes the UI to the internet (so it must not run without a login)."""
    return kind in PUBLIC_KINDS


def health_check(
    url: str,
    *,
    auth: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    interval: float = 2.0,
) -> int:
    """Poll ``url`` until it answers with a non-error status; returns the status.

    A fresh quick tunnel takes a few seconds to be reachable (DNS), hence the polling.

    Raises:
        TunnelError: no good answer within ``timeout`` seconds.
    """
    import httpx  # the webui feature's HTTP client (features.py)

    sent = {"User-Agent": "fastsd-healthcheck", **(headers or {})}
    if auth:
        sent["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            response = httpx.get(url, headers=sent, timeout=10, follow_redirects=True)
        except (httpx.HTTPError, OSError) as err:
            last = str(err) or type(err).__name__
        else:
            if response.status_code < 400:
                return response.status_code
            if response.status_code in (401, 403) and not auth:
                return response.status_code  # a login page answers: the tunnel works
            last = f"HTTP {response.status_code}"
        if time.monotonic() > deadline:
            raise TunnelError(
                f"{mask(url)} did not answer within {timeout:.0f} s ({last}): the tunnel is up but not "
                "reachable; try again, or another --tunnel"
            )
        time.sleep(interval)


def _spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # closing the tunnel ends the whole group (npx spawns node)
    )


def _stopper(proc: subprocess.Popen[str]) -> Callable[[], None]:
    def stop() -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue

    return stop


def read_until(
    proc: subprocess.Popen[str], parse: Callable[[str], str | None], timeout: float
) -> tuple[str | None, str]:
    """Read ``proc``'s output until ``parse`` finds something, it exits, or ``timeout``; returns (found, text)."""
    seen: list[str] = []
    found: list[str] = []
    done = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, ""):
            seen.append(line)
            if not found:
                value = parse("".join(seen))
                if value:
                    found.append(value)
                    done.set()
        done.set()

    threading.Thread(target=pump, daemon=True).start()
    done.wait(timeout)
    return (found[0] if found else None), "".join(seen)


# --------------------------------------------------------------------------------------------
# Colab


def colab_proxy_url(port: int) -> str:
    """Colab's proxy URL for ``port`` (only inside a Colab notebook kernel)."""
    from ..colab import proxy_url

    try:
        return proxy_url(port)
    except ImportError as err:
        raise UserInputError("--tunnel colab works only inside a Colab notebook: use ngrok or cloudflared") from err


def colab_tier() -> str:
    """``paid`` when the runtime shows a paid-plan sign, else ``unknown``.

    Colab exposes no API for the plan. Paid plans are the only way to A100/L4/H100 GPUs, TPUs, or
    High-RAM (over ~13 GB) machines, so those mean paid; a T4 with 12.7 GB RAM is what the free
    tier gives, but paid users can get it too, so that stays ``unknown``.
    """
    from ..runtime import gpus, ram_gb

    if any(k in os.environ for k in ("COLAB_TPU_ADDR", "TPU_NAME")):
        return "paid"
    if any(re.search(r"A100|L4|H100|V100|G4", g.name) for g in gpus()):
        return "paid"
    with contextlib.suppress(Exception):
        if ram_gb()["total_gb"] > 20:
            return "paid"
    return "unknown"


COLAB_FREE_NOTICE = (
    "Note: Colab's free tier does not allow web UIs reached through third-party tunnels (ngrok, cloudflared, "
    "localtunnel, gradio share); Colab may disconnect such sessions. fastsd found no sign of a paid plan here "
    "(it cannot tell for sure: Colab exposes no plan information, and a T4 with 12.7 GB RAM is given on both), "
    "so it uses Colab's own in-notebook proxy, which is allowed. On a paid plan, choose another --tunnel."
)


# --------------------------------------------------------------------------------------------
# ngrok


def ngrok_token(explicit: str | None = None) -> str:
    """The ngrok token: ``explicit``, else ``NGROK_AUTHTOKEN``, else the Colab secret of that name.

    Raises:
        UserInputError: none found (with where to get one).
    """
    from ..colab import secret

    token = explicit or secret("NGROK_AUTHTOKEN")
    if not token:
        raise UserInputError(
            "ngrok needs an authtoken: add it as the Colab secret NGROK_AUTHTOKEN (key icon on the left), set "
            "NGROK_AUTHTOKEN, or pass --ngrok-token; get one at https://dashboard.ngrok.com/get-started/your-authtoken"
        )
    token = token.strip()
    register(token)
    return token


def kill_stale_ngrok(process_iter: Callable[..., object] | None = None, *, echo: Callable[[str], None] = print) -> int:
    """Stop ngrok agents of this user left by earlier runs (a free account allows one). Returns how many."""
    import psutil
    from pyngrok import ngrok

    with contextlib.suppress(Exception):
        ngrok.kill()  # the one pyngrok started in this interpreter
    killed = 0
    me = os.getuid() if hasattr(os, "getuid") else None
    for proc in (process_iter or psutil.process_iter)(["name", "uids"]):  # type: ignore[operator]
        info = proc.info
        if info.get("name") != "ngrok":
            continue
        if me is not None and info.get("uids") and info["uids"].real != me:
            continue
        with contextlib.suppress(psutil.Error):
            proc.kill()
            killed += 1
    if killed:
        echo(f"stopped {killed} ngrok agent(s) left by an earlier run")
    return killed


def open_ngrok(port: int, *, token: str | None, auth: str | None, echo: Callable[[str], None]) -> Tunnel:
    try:
        from pyngrok import conf, ngrok
        from pyngrok.exception import PyngrokError
    except ImportError as err:
        raise UserInputError("ngrok needs pyngrok: run fastsd install --features webui") from err
    token = ngrok_token(token)
    kill_stale_ngrok(echo=echo)
    config = conf.PyngrokConfig(auth_token=token, monitor_thread=False, log_event_callback=None)
    options = {"basic_auth": [auth]} if auth else {}
    try:
        listener = ngrok.connect(str(port), "http", pyngrok_config=config, **options)
    except PyngrokError as err:
        text = " ".join(str(x) for x in (err, getattr(err, "ngrok_error", ""), *getattr(err, "ngrok_logs", [])[-5:]))
        raise TunnelError(ngrok_advice(text)) from None
    url = str(listener.public_url).replace("http://", "https://", 1)

    def close() -> None:
        with contextlib.suppress(Exception):
            ngrok.disconnect(listener.public_url, pyngrok_config=config)
        with contextlib.suppress(Exception):
            ngrok.kill(pyngrok_config=config)

    tunnel = Tunnel("ngrok", url, f"http://127.0.0.1:{port}", _close=close)
    try:
        health_check(url, auth=auth, headers={"ngrok-skip-browser-warning": "1"})
    except TunnelError:
        tunnel.close()
        raise
    return tunnel


# --------------------------------------------------------------------------------------------
# cloudflared


def cloudflared_binary(*, echo: Callable[[str], None] = print, fetch: bool = True) -> Path:
    """A working cloudflared: on PATH, in the cache, or fetched into the cache now.

    Raises:
        TunnelError: no build for this platform, or the binary does not run.
        NetworkError: the download failed.
    """
    found = shutil.which("cloudflared")
    if found:
        return Path(found)
    key = (platform.system(), platform.machine())
    asset = CLOUDFLARED_ASSETS.get(key)
    if asset is None:
        raise TunnelError(f"no cloudflared build for {key[0]} {key[1]}: use --tunnel ngrok")
    target = cache_dir() / "bin" / ("cloudflared.exe" if asset.endswith(".exe") else "cloudflared")
    if not target.is_file():
        if not fetch:
            raise TunnelError("cloudflared is not installed")
        if asset.endswith(".tgz"):
            raise TunnelError("install cloudflared with 'brew install cloudflared', then run again")
        echo(f"downloading cloudflared ({asset}) into {target.parent}")
        try:
            import httpx

            def produce(fh) -> None:  # type: ignore[no-untyped-def]
                with httpx.stream("GET", CLOUDFLARED_RELEASE + asset, follow_redirects=True, timeout=60) as r:
                    r.raise_for_status()
                    for chunk in r.iter_bytes(1 << 20):
                        fh.write(chunk)

            storage.write_stream(target, produce)
        except Exception as err:  # noqa: BLE001 - httpx and storage errors alike become one message
            raise NetworkError(
                f"could not download cloudflared ({err}): check the network or use --tunnel ngrok"
            ) from err
        target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    proc = subprocess.run([str(target), "--version"], capture_output=True, text=True)
    if proc.returncode != 0 or "cloudflared version" not in proc.stdout + proc.stderr:
        target.unlink(missing_ok=True)  # a damaged download is fetched again next time
        raise TunnelError("the downloaded cloudflared does not run here; run again to re-download, or use ngrok")
    return target


def open_cloudflared(port: int, *, echo: Callable[[str], None], timeout: float = 60.0) -> Tunnel:
    binary = cloudflared_binary(echo=echo)
    proc = _spawn([str(binary), "tunnel", "--no-autoupdate", "--url", f"http://127.0.0.1:{port}"])
    url, text = read_until(proc, parse_cloudflared_url, timeout)
    tunnel = Tunnel("cloudflared", url or "", f"http://127.0.0.1:{port}", _close=_stopper(proc))
    if not url:
        tunnel.close()
        raise TunnelError(
            (cloudflared_advice(text) or f"cloudflared printed no tunnel URL within {timeout:.0f} s")
            + f" (last line: {_last_line(text)})"
        )
    try:
        health_check(url)
    except TunnelError:
        tunnel.close()
        raise
    return tunnel


# --------------------------------------------------------------------------------------------
# localtunnel


def localtunnel_password(timeout: float = 10.0) -> str | None:
    """The password localtunnel visitors must enter: this runtime's public IP, as loca.lt reports it."""
    import httpx

    with contextlib.suppress(Exception):
        text = httpx.get("https://loca.lt/mytunnelpassword", timeout=timeout, follow_redirects=True).text.strip()
        if re.fullmatch(r"[0-9a-fA-F.:]+", text):
            return text
    return None


def open_localtunnel(port: int, *, echo: Callable[[str], None], timeout: float = 90.0) -> Tunnel:
    npx = shutil.which("npx")
    if npx is None:
        raise TunnelError("localtunnel needs Node.js (npx): install it (apt-get install nodejs npm) or use cloudflared")
    proc = _spawn([npx, "--yes", "localtunnel", "--port", str(port), "--local-host", "127.0.0.1"])
    url, text = read_until(proc, parse_localtunnel_url, timeout)
    tunnel = Tunnel("localtunnel", url or "", f"http://127.0.0.1:{port}", _close=_stopper(proc))
    if not url:
        tunnel.close()
        raise TunnelError(f"localtunnel printed no URL within {timeout:.0f} s (last line: {_last_line(text)})")
    password = localtunnel_password()
    tunnel.note = (
        f"visitors are asked for a tunnel password: {password}"
        if password
        else "visitors are asked for a tunnel password: this runtime's public IP (open https://loca.lt/mytunnelpassword here)"
    )
    try:
        # localtunnel's reminder page asks browsers for the password; this header skips it for the check.
        health_check(url, headers={"bypass-tunnel-reminder": "1"})
    except TunnelError:
        tunnel.close()
        raise
    return tunnel


# --------------------------------------------------------------------------------------------
# Entry point


def open_gradio_share(port: int, *, auth: str | None, echo: Callable[[str], None]) -> Tunnel:
    """A gradio share link (``*.gradio.live``) to ``127.0.0.1:port`` through gradio's own share servers.

    Works for any local HTTP server, not only a ``launch()``-ed gradio app: gradio's ``setup_tunnel``
    runs its frpc client for the port. The link lives 72 hours at most.
    """
    import secrets as _secrets

    try:
        from gradio.networking import setup_tunnel
    except ImportError as err:
        raise UserInputError("--tunnel gradio needs gradio: run 'fastsd install --features webui'") from err
    echo("opening a gradio share link...")
    try:
        url = setup_tunnel("127.0.0.1", int(port), _secrets.token_urlsafe(32), None, None)
    except Exception as err:  # noqa: BLE001 - gradio raises bare RuntimeError/OSError for every cause
        raise TunnelError(
            f"gradio could not create a share link ({_last_line(str(err))}): gradio's share servers may be "
            "unreachable or its frpc client blocked; use --tunnel cloudflared or ngrok"
        ) from err
    health_check(url, auth=auth)
    return Tunnel("gradio", url, f"http://127.0.0.1:{port}")


def open_tunnel(
    kind: str,
    port: int,
    *,
    auth: str | None = None,
    ngrok_token_value: str | None = None,
    echo: Callable[[str], None] = print,
) -> Tunnel:
    """Open a ``kind`` tunnel to ``127.0.0.1:port`` and check it answers.

    Args:
        kind: one of :data:`KINDS`.
        port: the local port of the web UI.
        auth: ``user:password``; for ngrok it is also enforced by the tunnel.
        ngrok_token_value: the ngrok authtoken (else ``NGROK_AUTHTOKEN`` / Colab secret).
        echo: where progress lines go.

    Returns:
        A :class:`Tunnel` with a checked public URL (``none``: the local URL).

    Raises:
        UserInputError: an unknown kind, or one that cannot work here.
        TunnelError: the tunnel did not come up or its URL did not answer (with advice).
    """
    local = f"http://127.0.0.1:{port}"
    if kind == "none":
        return Tunnel("none", local, local)
    if kind == "colab":
        url = colab_proxy_url(port)
        # The proxy URL only opens with the notebook user's Google login, so it cannot be fetched from here;
        # the local server is checked instead.
        health_check(local, auth=auth, timeout=10)
        return Tunnel("colab", url, local, note="opens only in the browser signed in to this notebook's account")
    if kind == "ngrok":
        return open_ngrok(port, token=ngrok_token_value, auth=auth, echo=echo)
    if kind == "cloudflared":
        return open_cloudflared(port, echo=echo)
    if kind == "localtunnel":
        return open_localtunnel(port, echo=echo)
    if kind == "gradio":
        return open_gradio_share(port, auth=auth, echo=echo)
    raise UserInputError(f"unknown tunnel {kind!r}: choose from {', '.join(KINDS)}")
