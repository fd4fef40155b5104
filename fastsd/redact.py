"""Keep secrets (tokens, passwords) out of logs, printed commands and notebook output.

Two ways in: values fastsd knows are secret are registered with :func:`register` (an ngrok token,
a generated web UI password) and masked wherever they appear; command lines are masked by flag
(:func:`mask_command`) so a ``--gradio-auth user:pass`` never reaches a log, even unregistered.
Token-shaped strings that slip through (Hugging Face ``hf_...``, ngrok's ``2...`` authtokens in
``authtoken=...``) are masked by pattern as a last line of defence.

Environment variables named like secrets (``HF_TOKEN``, ``NGROK_AUTHTOKEN``, ``CIVITAI_TOKEN``,
``*_API_KEY``...) are registered by :func:`register_environment`, and never handed to child
processes that do not need them: :func:`child_environment` builds an allow-list environment for
web UI backends. :func:`install_logging` puts the masking on every log record (fastsd's handlers
and those of the libraries it drives: pyngrok, httpx, uvicorn, gradio, huggingface_hub).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence

MASK = "****"

#: Flags whose following argument (or ``--flag=value``) is a secret.
SECRET_FLAGS = frozenset(
    {
        "--gradio-auth",
        "--api-auth",
        "--auth",
        "--ngrok",
        "--ngrok-token",
        "--authtoken",
        "--hf-token",
        "--token",
        "--password",
    }
)

_PATTERNS = (
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),  # Hugging Face tokens
    re.compile(r"(?i)(authtoken[\"'=:\s]+)([A-Za-z0-9_\-]{20,})"),  # ngrok configs and errors
    re.compile(r"(?i)(NGROK_AUTHTOKEN=)(\S+)"),
    re.compile(r"(?i)(Authorization:\s*(?:Basic|Bearer)\s+)(\S+)"),
    re.compile(r"(?i)([?&](?:token|key|sig|signature)=)([^&\s]+)"),  # signed download URLs (Civitai, S3)
)

_lock = threading.Lock()
_secrets: set[str] = set()


def register(*values: str | None) -> None:
    """Remember secret values so :func:`mask` hides them everywhere from now on.

    ``user:password`` pairs register the password as well as the pair. Short values (under 4
    characters) are not registered: masking them would garble unrelated text.
    """
    with _lock:
        for value in values:
            if not value:
                continue
            for part in (value, value.partition(":")[2]):
                if len(part) >= 4:
                    _secrets.add(part)


def forget_all() -> None:
    """Drop every registered secret (for tests)."""
    with _lock:
        _secrets.clear()


def mask(text: str, extra: Iterable[str | None] = ()) -> str:
    """``text`` with every registered secret, every ``extra`` value and token-shaped strings masked."""
    with _lock:
        values = set(_secrets)
    values.update(v for v in extra if v and len(v) >= 4)
    # Longest first, so a "user:pass" pair is masked whole before its "pass" part.
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + MASK, text)
    return text


def mask_command(argv: Sequence[str]) -> str:
    """A command line as one printable string, with the values of secret flags masked.

    Example:
        >>> mask_command(["python", "launch.py", "--gradio-auth", "me:hunter22", "--api"])
        'python launch.py --gradio-auth **** --api'
    """
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in SECRET_FLAGS:
            if eq:
                out.append(f"{flag}={MASK}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(mask(arg))
    return " ".join(_quote(a) for a in out)


def _quote(arg: str) -> str:
    return arg if arg and re.fullmatch(r"[\w@%+=:,./*-]+", arg) else "'" + arg.replace("'", "'\"'\"'") + "'"


# --------------------------------------------------------------------------------------------
# Environment

#: A variable whose name matches this holds a secret: its value is masked and never inherited.
SECRET_ENV_NAME = re.compile(
    r"(?i)TOKEN|SECRET|PASSW|PASSPHRASE|CREDENTIAL|AUTH|COOKIE|APIKEY|(?:^|_)(?:API_)?KEY(?:_|$)|PRIVATE"
)

#: What a Python web UI needs from the parent environment: where things are (PATH, HOME, temp and
#: cache folders), the locale, the GPU stack's settings, certificates and proxies. Nothing else is
#: passed on, so a token set for fastsd never reaches a backend or its extensions.
CHILD_ENV_NAMES = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "TZ",
        "TMPDIR", "TEMP", "TMP", "LD_LIBRARY_PATH",
        "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONDONTWRITEBYTECODE",
        "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
        "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
        "TRANSFORMERS_CACHE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_CACHE", "MPLCONFIGDIR",
        "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    }
)  # fmt: skip
CHILD_ENV_PREFIXES = (
    "LC_",
    "CUDA_",
    "CUDNN_",
    "NVIDIA_",
    "NCCL_",
    "PYTORCH_",
    "TORCH",
    "TRITON_",
    "HF_",
    "XDG_",
    "PIP_",
)

#: Values too common to mask (a secret-named flag set to "true" must not blank every "true").
_MIN_ENV_SECRET = 8


def is_secret_name(name: str) -> bool:
    """Whether an environment variable called ``name`` holds a secret (``HF_TOKEN``, ``OPENAI_API_KEY``...)."""
    return bool(SECRET_ENV_NAME.search(name))


def register_environment(environ: Mapping[str, str] | None = None) -> None:
    """Register the values of secret-named variables of ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    register(*(v for k, v in env.items() if is_secret_name(k) and len(v.strip()) >= _MIN_ENV_SECRET))


def child_environment(base: Mapping[str, str] | None = None, allow: Iterable[str] = ()) -> dict[str, str]:
    """An allow-list copy of ``base`` (default ``os.environ``) for a child process that needs no secrets.

    Keeps :data:`CHILD_ENV_NAMES`, variables starting with :data:`CHILD_ENV_PREFIXES` unless their
    name marks a secret (``HF_TOKEN`` is dropped, ``HF_HOME`` kept), and the names in ``allow``
    (what the caller knows the child needs, kept even if secret-named).

    Example:
        >>> child_environment({"PATH": "/bin", "HF_HOME": "/hf", "HF_TOKEN": "hf_x", "CIVITAI_TOKEN": "c"})
        {'PATH': '/bin', 'HF_HOME': '/hf'}
    """
    env = os.environ if base is None else base
    wanted = set(allow)
    out: dict[str, str] = {}
    for name, value in env.items():
        listed = name in CHILD_ENV_NAMES or (name.startswith(CHILD_ENV_PREFIXES) and not is_secret_name(name))
        if name in wanted or listed:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------
# Logging

#: Loggers of libraries fastsd drives that have been seen to log URLs, headers or tokens.
LIBRARY_LOGGERS = ("pyngrok", "httpx", "httpcore", "urllib3", "uvicorn", "gradio", "huggingface_hub")


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in every record it passes (message, traceback, stack)."""

    def filter(self, record: logging.LogRecord) -> bool:
        _mask_record(record)
        return True


def _mask_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken format string must not stop logging
        return
    record.msg, record.args = mask(message), None
    if record.exc_info and not record.exc_text:
        # Formatters reuse exc_text when set, so the traceback (which may quote a URL with its token)
        # is printed masked.
        record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = mask(record.stack_info)


def _masking_factory(previous: object) -> object:
    def make(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)  # type: ignore[operator]
        _mask_record(record)
        return record

    make._fastsd_redacting = True  # type: ignore[attr-defined]
    return make


def install_logging(handlers: Iterable[logging.Handler] = ()) -> None:
    """Mask secrets in every log line from now on (idempotent; the CLI and notebook setup call it).

    Registers secret-named environment variables, adds :class:`RedactingFilter` to the root
    logger's handlers, to ``handlers`` (ones fastsd created) and to the loggers in
    :data:`LIBRARY_LOGGERS` and their handlers, and masks records as they are created, so a
    handler a library configures later (uvicorn does, when it starts) cannot print a secret either.
    """
    register_environment()
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "_fastsd_redacting", False):
        logging.setLogRecordFactory(_masking_factory(factory))  # type: ignore[arg-type]
    owned = [*logging.getLogger().handlers, *handlers]
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        _add_filter(logger)
        owned += logger.handlers
    for handler in owned:
        _add_filter(handler)


def _add_filter(target: logging.Filterer) -> None:
    if not any(isinstance(f, RedactingFilter) for f in target.filters):
        target.addFilter(RedactingFilter())
