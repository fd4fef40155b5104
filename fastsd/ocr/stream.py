"""Incremental detokenization for streamed OCR answers: text deltas that never need taking back."""

from __future__ import annotations

from collections.abc import Callable

from .prompts import settled


class TextStream:
    """The text of one decoding row, given out piece by piece as its tokens arrive.

    Tokens are detokenized through a sliding window (the last chunk's tokens are decoded again with
    the new ones), so a character split over tokens is given out whole once it completes and each
    call costs only the new tokens (plus those of a character still incomplete). What is given out is a prefix of the row's final answer (the
    repetition guard's cut, stripped): :func:`~.prompts.settled` keeps back what the guard or the
    strip could still remove.

    Args:
        decode: token ids -> text (the processor's ``decode``, special tokens skipped).
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.text = ""  # everything decoded so far
        self.given = ""  # what :meth:`feed` has given out
        self._prefix = 0  # tokens[_prefix:_read] decoded to the tail of ``text``
        self._read = 0
        self._settled = 0  # characters of ``text`` no continuation can change

    def feed(self, tokens: list[int]) -> str:
        """The new text settled by ``tokens`` (all of the row's tokens so far), possibly ``""``."""
        before = self.decode(tokens[self._prefix : self._read])
        new = self.decode(tokens[self._prefix :])[len(before) :]
        if new and not new.endswith("\ufffd"):  # a clean end: the window moves on
            self.text += new
            self._prefix, self._read = self._read, len(tokens)
            new = ""
        # An unfinished UTF-8 sequence decodes to ONE trailing U+FFFD (maximal subparts, as Python and
        # the tokenizers library both replace); what precedes it can no longer change.
        visible = self.text + new[:-1]
        upto = settled(visible, self._settled)
        start = max(self._settled, len(visible) - len(visible.lstrip()))  # the answer is stripped
        self._settled = upto
        delta = visible[start:upto] if upto > start else ""
        self.given += delta
        return delta
