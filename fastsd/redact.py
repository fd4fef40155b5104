"""Keep secrets (tokens, passwords) out of logs, printed commands and notebook output.

Two ways in: values fastsd knows are secret are registered with :func:`register` (an ngrok token,
a generated web UI password) and masked wherever they appear; command lines are masked by flag
(:func:`mask_command`) so a ``--gradio-auth user:pass`` never reaches a log, even unregistered.
Token-shaped strings that slip through (Hugging Face ``hf_...``, ngrok's ``2...`` authtokens in
``authtoken=...``) are masked by pattern as a last line of defence.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Sequence

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


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not stop logging
            return True
        record.msg, record.args = mask(message), None
        return True
