"""Stop strings over streamed text: find them across token boundaries and never stream past one."""

from __future__ import annotations


class StopStringText:
    """Accumulates a choice's text and releases only what can no longer become part of a stop string."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0

    def add(self, delta: str) -> bool:
        """Append new text; True when a stop string now occurs (the text is cut before it)."""
        if not delta:
            return False
        search_from = max(0, len(self.text) - self.hold)
        self.text += delta
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def release(self, final: bool) -> str:
        """Text not yet emitted that is safe to emit now (everything when ``final``)."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
