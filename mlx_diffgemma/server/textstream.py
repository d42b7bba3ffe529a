"""Committed answer text -> content deltas: stop strings across canvases, tool calls held.

Text arrives one canvas at a time. A stop string may straddle two canvases, so the end
of the text that could still begin one is held back until the next canvas decides it.
With tools, everything from a `<|tool_call>` marker on is held and parsed at the end;
calls that parse become tool calls, the rest goes out as text.
"""

from typing import List, Tuple

from .tools import CALL_OPEN, ToolCall, parse_tool_calls

# Channel markers belong to the thinking split; one that a model writes mid-answer is dropped
# so that it never reaches a client's content.
_MARKERS = ("<|channel>", "<channel|>")


def clean(text: str) -> str:
    for m in _MARKERS:
        text = text.replace(m, "")
    return text


class TextStream:
    """Content deltas from answer deltas.

    Args:
        stop: stop strings; the content ends before the first one.
        tools: hold and parse Gemma 4 tool calls.
    """

    def __init__(self, stop: List[str], tools: bool):
        self.stop = list(stop)
        self.tools = tools
        self.pending = ""  # text not emitted yet
        self.calls_text = ""  # tools: text from the first call marker on
        self.stopped = False
        self.hit = None  # the stop string that ended the content

    def add(self, text: str) -> str:
        """Add committed answer text; return the content that is now final."""
        if self.stopped:
            return ""
        if self.calls_text:
            self.calls_text += text
            return ""
        self.pending += text
        if self.tools and CALL_OPEN in self.pending:
            head, _, rest = self.pending.partition(CALL_OPEN)
            self.pending, self.calls_text = head, CALL_OPEN + rest
            out = self._cut(final=True)
            return out
        return self._cut(final=False)

    def _cut(self, final: bool) -> str:
        hits = [(self.pending.find(s), s) for s in self.stop if s in self.pending]
        if hits:
            at, self.hit = min(hits)
            out, self.pending, self.stopped = self.pending[:at], "", True
            self.calls_text = ""
            return clean(out)
        keep = 0 if final else self._held()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return clean(out)

    def _held(self) -> int:
        """Length of the longest end of `pending` that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if s.startswith(self.pending[-n:]):
                    best = n
                    break
        return best

    def finish(self) -> Tuple[str, List[ToolCall]]:
        """The held content and the parsed tool calls, at the end of generation."""
        out = self._cut(final=True)
        if self.stopped or not self.calls_text:
            return out, []
        rest, calls = parse_tool_calls(self.calls_text)
        return out + clean(rest), calls
