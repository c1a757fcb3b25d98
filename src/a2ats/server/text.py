"""Token ids in, text out as it becomes final: incremental detokenization and ``stop`` strings."""

from __future__ import annotations

from collections.abc import Iterable


class TextStream:
    """The text of a sequence, released a delta at a time.

    A delta never ends inside a multi-byte character: byte-level tokenizers split characters across tokens,
    and a partial one decodes to U+FFFD, so text waits until the character completes. Each step decodes a
    few tokens of context before the new ones (some tokenizers drop a token's leading space when it is
    decoded alone), as inference servers commonly do. With ``stop`` strings, text that may be the start of
    one is held back until it is not; at a stop the text is cut before it and ``stopped`` is set.
    ``skip``: ids that are never text (the end-of-sequence tokens)."""

    def __init__(self, tokenizer, stop: Iterable[str] = (), skip: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip = set(skip)
        self.stopped = False
        self.text = ""  # released so far
        self._ids: list[int] = []
        self._prefix = 0  # context tokens start here ...
        self._read = 0  # ... and the tokens not yet turned into text here
        self._held = ""  # decoded, not yet released (it may begin a stop string)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _new_text(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # nothing yet, or a character still incomplete
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :] if after.startswith(before) else after

    def push(self, token: int) -> str:
        """The text that ``token`` makes final (often '', never part of a character)."""
        if self.stopped or token in self.skip:
            return ""
        self._ids.append(token)
        self._held += self._new_text(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest, at the end of the sequence."""
        if self.stopped:
            return ""
        if self._read < len(self._ids):
            self._held += self._new_text(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        held = self._held
        hits = [i for i in (held.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.stopped, self._held = held[: min(hits)], True, ""
        else:
            keep = 0 if final else self._stop_prefix(held)
            out, self._held = held[: len(held) - keep], held[len(held) - keep :]
        self.text += out
        return out

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest end of ``text`` that some stop string starts with (0: none)."""
        longest = max((len(s) for s in self.stop), default=1) - 1
        for n in range(min(longest, len(text)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0
