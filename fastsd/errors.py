"""One small exception hierarchy. The CLI maps each to a one-line message and an exit code.

Library callers can catch precisely (``except SessionLockedError``) instead of parsing messages.
"""

from __future__ import annotations


class FastsdError(Exception):
    """A failure the user can act on. ``str(err)`` is the whole message: what and what to do."""

    exit_code = 1


class UserInputError(FastsdError):
    """Bad usage or input: a wrong name, path, value or combination of settings (exit code 2)."""

    exit_code = 2


class ModelFormatError(UserInputError):
    """A file or folder is not the kind of model it was expected to be (truncated, LoRA, VAE...)."""


class InstallError(FastsdError):
    """A package could not be installed; the installer's own output was already shown."""


class NetworkError(FastsdError):
    """Something needed the network and could not reach it."""


class SessionLockedError(FastsdError):
    """A session is in use by another process."""


class StorageError(FastsdError):
    """A write failed (disk full, Drive dropped the file...). Nothing complete was replaced."""


class DemoStepError(FastsdError):
    """A step of ``fastsd demo`` failed; the message names the step and its cause.

    The exit code is the cause's (2 for bad input such as an unknown ``--model``), else 1.
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.exit_code = getattr(cause, "exit_code", FastsdError.exit_code)
