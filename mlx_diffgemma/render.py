"""The terminal renderer of the commands: committed text as it comes, the live canvas.

It knows text, styles and terminal cells; nothing of the model. Widths are counted per
grapheme cluster with `wcwidth`, as terminals draw them: a combining mark or a vowel sign
joins its base character, CJK takes two cells. An over-counted width would move the
cursor up too far on a redraw and erase lines above the output.
"""

import math
import shutil
import sys
import unicodedata

import click
import wcwidth

DIM, THINKING, RESET = "\x1b[2m", "\x1b[2;3m", "\x1b[0m"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


class Output:
    """Prints committed text as it comes.

    On a terminal, thinking is dimmed; elsewhere it goes to stderr, so stdout holds the
    answer alone. With `live` (a terminal only), the canvas being denoised is redrawn
    below the committed text after every step: positions whose sample this step
    accepted in normal type, the argmax guess of the others dimmed. The redrawn region
    starts at a line start, so the unfinished last committed line is part of it.
    """

    def __init__(self, tokenizer, show_thinking: bool, live: bool):
        self.tokenizer = tokenizer
        self.show_thinking = show_thinking
        self.tty = sys.stdout.isatty()
        self.live = live
        self.line = []  # live: (text, style) pieces of the unfinished last line
        self.rows = 0  # live: terminal rows of the region drawn now
        self.thought = False  # thinking was shown and not yet followed by a newline
        self.started = False

    def show(self, r):
        """Print one `GenerationResponse`."""
        self.started = True
        if r.kind == "draft":
            self.redraw(self._canvas(r.draft_tokens, r.draft_accepted))
            return
        if r.thinking and self.show_thinking:
            if self.tty:
                self._write(r.thinking, THINKING)
            else:
                click.echo(r.thinking, err=True, nl=False)
            self.thought = True
        if r.text:
            self._end_thinking()
            self._write(r.text)

    def end(self):
        """Finish the answer with a newline; leave the terminal as it was."""
        if not self.started:
            return
        self.started = False
        self._end_thinking()
        if self.live:
            self._erase()
            click.echo("".join(_styled(t, s) for t, s in self.line) + SHOW_CURSOR, nl=False)
            self.line = []
        click.echo()

    def _end_thinking(self):
        if self.thought:
            self.thought = False
            if self.tty:
                self._write("\n\n")
            else:
                click.echo(err=True)

    def _write(self, text: str, style: str = ""):
        if not self.live:
            click.echo(_styled(text, style), nl=False)
            return
        # Print the finished lines for good; the unfinished one stays in the region.
        head, line = [], []
        for t, s in self.line + [(text, style)]:
            if "\n" in t:
                cut = t.rindex("\n") + 1
                head += line + [(t[:cut], s)]
                line = [(t[cut:], s)]
            else:
                line.append((t, s))
        self.line = line
        self._erase()
        click.echo("".join(_styled(t, s) for t, s in head), nl=False)
        self.redraw([])

    def _canvas(self, tokens, accepted):
        # Decode runs of equal acceptance together, so multi-token characters stay whole.
        pieces, start = [], 0
        for i in range(1, len(tokens) + 1):
            if i == len(tokens) or accepted[i] != accepted[start]:
                text = self.tokenizer.decode(tokens[start:i])
                pieces.append((text, "" if accepted[start] else DIM))
                start = i
        return pieces

    def redraw(self, canvas):
        self._erase()
        cols, lines = shutil.get_terminal_size()
        region, width = fit(self.line + canvas, cols * max(1, lines - 1) - 1)
        click.echo(HIDE_CURSOR + "".join(_styled(t, s) for t, s in region), nl=False)
        self.rows = max(1, math.ceil(width / cols))

    def _erase(self):
        if self.rows:
            up = f"\x1b[{self.rows - 1}A" if self.rows > 1 else ""
            click.echo(f"{up}\r\x1b[J", nl=False)
            self.rows = 0


def _styled(text: str, style: str) -> str:
    return f"{style}{text}{RESET}" if style and text else text


def _printable(cluster: str, column: int) -> str:
    """One grapheme cluster as the region draws it: on one line, no control characters."""
    if cluster == "\t":
        return " " * (8 - column % 8)
    if "\n" in cluster:
        return "\u21b5"  # the region has no line breaks, so its height is known
    if any(unicodedata.category(ch) == "Cc" for ch in cluster):
        return "\ufffd"
    return cluster


def text_width(text: str) -> int:
    """Terminal cells of printable text (no tabs, newlines or control characters)."""
    return max(0, wcwidth.wcswidth(text))


def fit(pieces, limit: int):
    """Pieces made printable on one wrapped line of at most `limit` cells, and their width.

    Clusters are found in the joined text: a vowel sign decoded apart from its consonant
    (another piece) still joins it. A cluster takes the style of its first character.
    """
    text = "".join(t for t, _ in pieces)
    styles = [s for t, s in pieces for _ in t]
    out, width, pos = [], 0, 0
    for cluster in wcwidth.iter_graphemes(text):
        style = styles[pos]
        pos += len(cluster)
        shown = _printable(cluster, width)
        w = text_width(shown)
        if width + w > limit:
            _append(out, "\u2026", style)
            return out, width + 1
        _append(out, shown, style)
        width += w
    return out, width


def _append(out, text: str, style: str):
    if out and out[-1][1] == style:
        out[-1] = (out[-1][0] + text, style)
    else:
        out.append((text, style))
