"""Command line: `mlx_diffgemma generate`, `mlx_diffgemma infill` and `mlx_diffgemma convert`.

Parse, call the public API, print. The answer goes to stdout; statistics, notes and
errors go to stderr. Unset sampler flags stay None, so the precedence of `config.py`
applies (flag > generation_config.json > transformers' defaults).
"""

import math
import shutil
import sys
import unicodedata
from typing import List, Optional

import click

# 4-bit mixed build (15.4 GB): fits a 24 GB Mac. The bf16 original is google/diffusiongemma-26B-A4B-it.
DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"

# Sampler flag -> DiffusionConfig field.
SAMPLER_FLAGS = {
    "--steps": "max_denoising_steps",
    "--entropy-bound": "entropy_bound",
    "--t-min": "t_min",
    "--t-max": "t_max",
    "--stability-threshold": "stability_threshold",
    "--confidence-threshold": "confidence_threshold",
}

DIM, THINKING, RESET = "\x1b[2m", "\x1b[2;3m", "\x1b[0m"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def _char_width(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


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
            self._redraw(self._canvas(r.draft_tokens, r.draft_accepted))
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
        self._redraw([])

    def _canvas(self, tokens, accepted):
        # Decode runs of equal acceptance together, so multi-token characters stay whole.
        pieces, start = [], 0
        for i in range(1, len(tokens) + 1):
            if i == len(tokens) or accepted[i] != accepted[start]:
                text = self.tokenizer.decode(tokens[start:i])
                pieces.append((text, "" if accepted[start] else DIM))
                start = i
        return pieces

    def _redraw(self, canvas):
        self._erase()
        cols, lines = shutil.get_terminal_size()
        region, width = _fit(self.line + canvas, cols * max(1, lines - 1) - 1)
        click.echo(HIDE_CURSOR + "".join(_styled(t, s) for t, s in region), nl=False)
        self.rows = max(1, math.ceil(width / cols))

    def _erase(self):
        if self.rows:
            up = f"\x1b[{self.rows - 1}A" if self.rows > 1 else ""
            click.echo(f"{up}\r\x1b[J", nl=False)
            self.rows = 0


def _styled(text: str, style: str) -> str:
    return f"{style}{text}{RESET}" if style and text else text


def _fit(pieces, limit: int):
    """Pieces made printable on one wrapped line of at most `limit` cells, and their width."""
    out, width = [], 0
    for text, style in pieces:
        chars = []
        for ch in text:
            if ch == "\t":
                ch = " " * (8 - width % 8)
            elif ch == "\n":
                ch = "\u21b5"  # the region has no line breaks, so its height is known
            elif unicodedata.category(ch) == "Cc":
                ch = "\ufffd"
            w = sum(map(_char_width, ch))
            if width + w > limit:
                out.append(("".join(chars) + "\u2026", style))
                return out, width + 1
            chars.append(ch)
            width += w
        out.append(("".join(chars), style))
    return out, width


def _read_prompt(prompt: Optional[str]) -> str:
    if prompt is None:
        raise click.UsageError(
            "Missing --prompt: give the message, - to read it from stdin, or use --chat."
        )
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.BadParameter(
            "the prompt is empty; give some text (or - to read it from stdin).",
            param_hint="'--prompt'",
        )
    return prompt


def _one_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _answer(model, tokenizer, prompt, out: Output, verbose: bool, **kwargs):
    """Stream one answer to `out`; statistics to stderr."""
    from .generate import format_stats, stream_generate

    last = None
    try:
        for last in stream_generate(model, tokenizer, prompt, drafts=out.live, **kwargs):
            out.show(last)
    except ValueError as e:  # prompt or settings rejected before any work
        raise click.ClickException(_one_line(e))
    finally:
        out.end()
    if last.finish_reason == "stop" and last.generation_tokens == 0:
        click.echo(
            "[WARNING] The answer is empty: the model put EOS first. Another --seed may help.",
            err=True,
        )
    if verbose:
        click.echo(format_stats(last), err=True)


def _chat(answer, model, system: Optional[str], think: bool):
    from .generate import PromptCache

    cache = PromptCache(model)
    click.echo("Chat: type a message and press Enter; Ctrl-D ends the chat.", err=True)
    while True:
        try:
            line = input(">> ")
        except EOFError:
            click.echo(err=True)
            return
        if not line.strip():
            continue
        messages = [{"role": "user", "content": line}]
        first = len(cache) == 0
        if first and system:
            messages.insert(0, {"role": "system", "content": system})
        answer(messages, prompt_cache=cache, enable_thinking=think if first else None)


def _sampler_options(command):
    """Add the sampler flags of SAMPLER_FLAGS (shared by the commands that generate)."""
    options = [
        click.option(
            "--steps",
            type=click.IntRange(min=1),
            default=None,
            help="Denoising steps per canvas at most "
            "[default: the checkpoint's max_denoising_steps].",
        ),
        click.option(
            "--entropy-bound",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Entropy (nats) a step may accept; larger accepts more tokens per step.",
        ),
        click.option(
            "--t-min",
            type=click.FloatRange(min=0),
            default=None,
            help="Temperature toward the last step.",
        ),
        click.option(
            "--t-max",
            type=click.FloatRange(min=0),
            default=None,
            help="Temperature of the first step.",
        ),
        click.option(
            "--stability-threshold",
            type=click.IntRange(min=0),
            default=None,
            help="Stop a canvas once its argmax is unchanged for this many steps (and confident).",
        ),
        click.option(
            "--confidence-threshold",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="... and its mean token entropy is below this.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command(name="generate", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    "model_path",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Checkpoint folder (converted or transformers layout) or Hugging Face repo id.",
)
@click.option("--prompt", "-p", default=None, help="The user message; - reads it from stdin.")
@click.option("--system", "--system-prompt", default=None, help="System prompt.")
@click.option(
    "--max-tokens",
    "-m",
    type=click.IntRange(min=1),
    default=None,
    help="Output tokens at most; whole canvases are computed and the output is trimmed "
    "[default: the checkpoint's max_new_tokens].",
)
@_sampler_options
@click.option("--seed", type=int, default=None, help="Seed of all random draws [default: random].")
@click.option("--think/--no-think", default=False, help="Thinking mode.  [default: no-think]")
@click.option(
    "--show-thinking/--hide-thinking",
    default=True,
    help="Show the thinking (dimmed; on stderr when stdout is not a terminal) or hide it.",
)
@click.option(
    "--chat", is_flag=True, help="Multi-turn chat on stdin; each turn encodes only its new tokens."
)
@click.option(
    "--live", is_flag=True, help="Redraw the canvas at every denoising step (terminals only)."
)
@click.option("--verbose", "-v", is_flag=True, help="Print statistics to stderr.")
def generate_command(
    model_path,
    prompt,
    system,
    max_tokens,
    seed,
    think,
    show_thinking,
    chat,
    live,
    verbose,
    **sampler,
):
    """Generate text with DiffusionGemma."""
    from .generate import ineffective_settings, resolve_config
    from .loader import load

    if chat and prompt is not None:
        raise click.UsageError("--prompt cannot be used with --chat; type the messages instead.")
    if not chat:
        prompt = _read_prompt(prompt)
    given = {f: sampler[f.lstrip("-").replace("-", "_")] for f in SAMPLER_FLAGS}
    settings = {SAMPLER_FLAGS[f]: v for f, v in given.items()}
    out = None
    try:
        try:
            model, tokenizer = load(model_path)
        except (OSError, ValueError) as e:
            raise click.ClickException(_one_line(e))
        try:
            config = resolve_config(model, max_tokens=max_tokens, **settings)
        except ValueError as e:
            raise click.UsageError(_one_line(e))
        no_effect = ineffective_settings(config)
        for flag, value in given.items():
            if value is not None and SAMPLER_FLAGS[flag] in no_effect:
                click.echo(
                    f"[WARNING] {flag} has no effect: {no_effect[SAMPLER_FLAGS[flag]]}.", err=True
                )
        if live and not sys.stdout.isatty():
            click.echo("[WARNING] --live has no effect: stdout is not a terminal.", err=True)
        out = Output(tokenizer, show_thinking, live and sys.stdout.isatty())

        def answer(messages, **kwargs):
            _answer(model, tokenizer, messages, out, verbose, config=config, seed=seed, **kwargs)

        if chat:
            _chat(answer, model, system, think)
        else:
            messages = [{"role": "system", "content": system}] if system else []
            answer(messages + [{"role": "user", "content": prompt}], enable_thinking=think)
    except KeyboardInterrupt:
        if out is not None and out.live:
            click.echo(RESET + SHOW_CURSOR, nl=False)
        # On a terminal, start a line of its own after the echoed ^C.
        click.echo(("\n" if sys.stderr.isatty() else "") + "Interrupted.", err=True)
        click.get_current_context().exit(130)


@click.command(name="infill", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    "model_path",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Checkpoint folder (converted or transformers layout) or Hugging Face repo id.",
)
@click.option(
    "--text",
    "-t",
    default=None,
    help="Text with [[hole]], [[hole:N]] or [[edit]]old text[[/edit]] markup; - reads stdin.",
)
@click.option(
    "--file",
    "-f",
    "path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Read the text with markup from this file.",
)
@click.option(
    "--instruction",
    "-i",
    default=None,
    help="A user message before the text (chat template); without it the text follows <bos>.",
)
@click.option("--system", "--system-prompt", default=None, help="System prompt (chat template).")
@click.option(
    "--hole-tokens",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Tokens of a [[hole]] without :N.",
)
@_sampler_options
@click.option("--seed", type=int, default=None, help="Seed of all random draws [default: random].")
@click.option("--fills", is_flag=True, help="Print only the fills, one per line (as JSON strings).")
@click.option("--verbose", "-v", is_flag=True, help="Print statistics to stderr.")
def infill_command(
    model_path, text, path, instruction, system, hole_tokens, seed, fills, verbose, **sampler
):
    """Fill the holes of a text; the text around them is kept byte for byte.

    The text before the first hole goes to the encoder; from the first hole on, the text
    is clamped on the canvas and only the holes (and edit regions) are denoised. A hole
    has exactly its budget of tokens; a <pad> or EOS the model writes in it ends the fill.
    Text longer than a canvas continues on the next canvas; a hole sees the text up to
    the end of its own canvas.
    """
    import json

    from .generate import format_stats, resolve_config
    from .infill import InfillTemplate, infill
    from .loader import load

    if (text is None) == (path is None):
        raise click.UsageError("Give the text with --text (- for stdin) or --file.")
    if path is not None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    elif text == "-":
        text = sys.stdin.read()
    settings = {SAMPLER_FLAGS[f]: sampler[f.lstrip("-").replace("-", "_")] for f in SAMPLER_FLAGS}
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": instruction}] if instruction else []
    try:
        try:
            model, tokenizer = load(model_path)
        except (OSError, ValueError) as e:
            raise click.ClickException(_one_line(e))
        try:
            config = resolve_config(model, **settings)
            template = InfillTemplate.parse(tokenizer, text, hole_tokens)
        except ValueError as e:
            raise click.UsageError(_one_line(e))
        try:
            result = infill(
                model, tokenizer, template, messages=messages or None, config=config, seed=seed
            )
        except ValueError as e:
            raise click.ClickException(_one_line(e))
    except KeyboardInterrupt:
        click.echo(("\n" if sys.stderr.isatty() else "") + "Interrupted.", err=True)
        click.get_current_context().exit(130)
    if fills:
        for fill in result.fills:
            click.echo(json.dumps(fill, ensure_ascii=False))
    else:
        click.echo(result.text, nl=not result.text.endswith("\n"))
    if verbose:
        click.echo(format_stats(result.response), err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """DiffusionGemma (block text diffusion) on MLX."""


cli.add_command(generate_command)
cli.add_command(infill_command)


@cli.command(
    name="convert",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def convert_command(args):
    """Convert a transformers checkpoint to MLX (see `convert --help`)."""
    from .convert import main as convert_main  # imported late: it loads the converter

    convert_main(list(args))


def main(args: Optional[List[str]] = None) -> None:
    """Console entry point `mlx_diffgemma`."""
    cli.main(args=args, prog_name="mlx_diffgemma")


if __name__ == "__main__":
    main()
