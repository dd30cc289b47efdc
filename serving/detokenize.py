"""Token ids -> text, incrementally, the way `splitserve generate` decodes them at the end.

The text of n tokens is always `tokenizer.decode(tokens[:n], skip_special_tokens=True)`, so
the streamed deltas concatenate to exactly the non-streamed text. A delta is held back while
the text ends in U+FFFD (a multi-byte character split across tokens) or could be the start of
a stop string; stop strings are cut from the text, as OpenAI does.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = []
        self.text = ""          # the text so far, stop strings cut
        self.num_sent = 0       # characters of `text` already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Append one token; returns the new text that is safe to send (maybe "")."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        if self.tokenizer is None:  # dummy weights: the ids themselves, space-separated
            self.text = " ".join(map(str, self.tokens))
        else:
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """The request ended: whatever was held back."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end = self.text.rstrip("\ufffd").__len__()
            for s in self.stop:  # a stop string may be forming at the end: hold its prefix
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text[:end].endswith(s[:k]):
                        end -= k
                        break
        end = max(end, self.num_sent)
        delta = self.text[self.num_sent:end]
        self.num_sent = end
        return delta
