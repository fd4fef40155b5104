"""Library log lines a fastsd user cannot act on, dropped before they print; per-request chatter quieted.

Each entry names the logger that emits the line and a pattern of its text, so a new library
version that words it differently shows it again rather than hiding something else. Used by the
CLI at start and by the notebooks' set-up cell; ``--debug`` shows everything.
"""

from __future__ import annotations

import logging
import re

#: (logger, pattern, why it means nothing to a fastsd user).
MEANINGLESS: tuple[tuple[str, str, str], ...] = (
    (
        "bitsandbytes.backends.cpu.ops",
        r"gemm_4bit.*kernels-community",
        "an optional CPU kernel for 4-bit inference; fastsd trains and generates on the GPU",
    ),
    (
        "transformers.utils.import_utils",
        r"requires torchvision \(not installed\); falling back to `\w+Pil`",
        "the PIL image processor is the one fastsd uses; torchvision is not needed",
    ),
    (
        "diffusers.models.modeling_utils",
        r"There are modules in \w+ that should be kept in float32: \[\]",
        "the list of such modules is empty, so the cast changes nothing",
    ),
)

#: Loggers whose INFO lines are per-request chatter (``HTTP Request: GET ...``).
CHATTY: tuple[str, ...] = ("httpx", "httpx2", "httpcore", "urllib3")


class _Drop(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet(debug: bool = False) -> None:
    """Drop the :data:`MEANINGLESS` lines and the :data:`CHATTY` INFO lines (idempotent).

    huggingface_hub has its own stderr handler *and* propagates to the root logger, which printed
    each of its lines twice; it keeps its own handler only.
    """
    logging.getLogger("huggingface_hub").propagate = False
    if debug:
        return
    for name, pattern, _why in MEANINGLESS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_Drop(pattern))
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
