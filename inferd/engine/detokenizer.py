"""Incremental detokenization with stop strings.

Text is only emitted once it decodes cleanly (no U+FFFD from a split multi-byte character), and while a
request runs the last (longest stop string − 1) characters are held back, so a stop string that arrives
across several tokens never leaks into the stream.
"""

from __future__ import annotations

import codecs

from inferd.loader.tokenizer import Tokenizer

CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens (leading-space rules of SPM)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop: bool):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop
        self.include_stop = include_stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.emitted = 0
        self.table = tokenizer.byte_table(skip_special_tokens)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if self.table is not None else None

    def _check_stop(self, start: int) -> str | None:
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx >= 0:
                self.text = self.text[: idx + (len(s) if self.include_stop else 0)]
                return s
        return None

    def add(self, token_id: int) -> str | None:
        """Append one token; returns the stop string if one now appears in the text (text is cut there)."""
        if self.utf8 is not None:  # byte-level BPE: O(1) per token
            assert self.table is not None
            piece = self.table[token_id] if token_id < len(self.table) else b""
            new = self.utf8.decode(piece, final=False)
            if not new:
                return None
            start = max(0, len(self.text) - self.hold)
            self.text += new
            return self._check_stop(start) if self.stop else None
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            start = max(0, len(self.text) - self.hold)
            self.text += new
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return self._check_stop(start)
        return None

    def flush(self) -> None:
        """At the end, keep whatever is left even if it ends in a partial character."""
        if self.utf8 is not None:
            self.text += self.utf8.decode(b"", final=True)
            return
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.ids)

    def take_delta(self, finished: bool) -> str:
        """New text since the last call (withholding a possible stop-string prefix while running)."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
