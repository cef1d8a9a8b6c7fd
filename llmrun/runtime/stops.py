"""Stop strings: text that ends an answer and is never part of it.

A stop string can arrive split over several tokens, so text that could be the start of one
is held back until the next piece shows whether it is (llama.cpp's server and vLLM do the
same)."""

from __future__ import annotations


class StopStrings:
    """Feed each text piece to `push`; it returns the text safe to show now and whether a stop
    string was reached (then nothing after it is shown). `flush` gives what is held back once
    the answer ends for another reason."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held, self.stopped = "", True
            return text[:min(found)], True
        keep = self._partial_suffix(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text

    def _partial_suffix(self, text: str) -> int:
        """The length of the longest end of `text` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
