"""Incremental detokenization with stop strings.

Text is emitted only when it is complete UTF-8 (a byte-level BPE token can end mid-character: its
decode then ends in U+FFFD and waits for the next token), and the last ``len(longest stop) - 1``
characters are held back until they cannot be the start of a stop string, so a client never sees
half a stop string.
"""

from __future__ import annotations

from deltaserve.tokenizer import Tokenizer

# Decode from a few tokens back: byte-level BPE needs the preceding tokens to merge spaces right.
_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool,
                 include_stop_str: bool):
        self.tok = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.stop = stop
        self.skip_special = skip_special_tokens
        self.include_stop = include_stop_str
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all completed text (a stop string cut off, unless included)
        self.emitted = 0  # characters of ``text`` already handed out

    def add(self, token_id: int) -> bool:
        """Append one token. Returns True when a stop string ends the text."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip_special)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return False  # an incomplete character, or a token with no text
        start = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._check_stop(start)

    def _check_stop(self, new_from: int) -> bool:
        for s in self.stop:
            i = self.text.find(s, max(0, new_from - len(s) + 1))
            if i >= 0:
                self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
                return True
        return False

    def delta(self, finished: bool) -> str:
        """Text that is safe to emit now (everything, once finished)."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        out, self.emitted = self.text[self.emitted : end], end
        return out
