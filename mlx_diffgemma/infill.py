"""The infill command: `mlx_diffgemma infill` / `python -m mlx_diffgemma.infill`.

It drives `tasks/infill.py` (hole syntax and budgets are documented there).
"""

import json
from typing import List, Optional

import click

from .generate import format_stats, resolve_config
from .options import (
    CONTEXT_SETTINGS,
    SAMPLER_FLAGS,
    adapter_option,
    interrupted,
    model_option,
    one_line,
    read_file,
    read_stdin,
    sampler_flags,
    sampler_options,
    seed_option,
)
from .tasks.infill import DEFAULT_HOLE_TOKENS, InfillResult, InfillTemplate, infill


def _read_text(text: Optional[str], path: Optional[str]) -> str:
    if (text is None) == (path is None):
        raise click.UsageError("Give the text with --text (- for stdin) or --file.")
    if path is not None:
        return read_file(path)
    return read_stdin() if text == "-" else text


def _run_infill(
    model_path, adapter_path, text, messages, hole_tokens, seed, settings
) -> InfillResult:
    """Load, parse and fill; every rejected input as a one-line error."""
    from .loader import load  # imported here for a quick --help (see generate.py)

    try:
        model, tokenizer = load(model_path, adapter_path=adapter_path)
    except (OSError, ValueError) as e:
        raise click.ClickException(one_line(e)) from None
    try:
        config = resolve_config(model, **settings)
        template = InfillTemplate.parse(tokenizer, text, hole_tokens)
    except ValueError as e:
        raise click.UsageError(one_line(e)) from None
    try:
        return infill(
            model, tokenizer, template, messages=messages or None, config=config, seed=seed
        )
    except ValueError as e:
        raise click.ClickException(one_line(e)) from None


@click.command(name="infill", context_settings=CONTEXT_SETTINGS)
@model_option
@adapter_option
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
    default=DEFAULT_HOLE_TOKENS,
    show_default=True,
    help="Tokens of a [[hole]] without :N.",
)
@sampler_options
@seed_option
@click.option("--fills", is_flag=True, help="Print only the fills, one per line (as JSON strings).")
@click.option("--verbose", "-v", is_flag=True, help="Print statistics to stderr.")
def infill_command(
    model_path,
    adapter_path,
    text,
    path,
    instruction,
    system,
    hole_tokens,
    seed,
    fills,
    verbose,
    **sampler,
):
    """Fill the holes of a text; the text around them is kept byte for byte.

    The text before the first hole goes to the encoder; from the first hole on, the text
    is clamped on the canvas and only the holes (and edit regions) are denoised. A hole
    has exactly its budget of tokens; a <pad> or EOS the model writes in it ends the fill.
    Text longer than a canvas continues on the next canvas; a hole sees the text up to
    the end of its own canvas.
    """
    text = _read_text(text, path)
    settings = {SAMPLER_FLAGS[f]: v for f, v in sampler_flags(sampler).items()}
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": instruction}] if instruction else []
    try:
        result = _run_infill(model_path, adapter_path, text, messages, hole_tokens, seed, settings)
    except KeyboardInterrupt:
        interrupted()
    if fills:
        for fill in result.fills:
            click.echo(json.dumps(fill, ensure_ascii=False))
    else:
        click.echo(result.text, nl=not result.text.endswith("\n"))
    if verbose:
        click.echo(format_stats(result.response), err=True)


def main(args: Optional[List[str]] = None) -> None:
    """Command-line entry point (`python -m mlx_diffgemma.infill`)."""
    infill_command.main(args=args, prog_name="python -m mlx_diffgemma.infill")


if __name__ == "__main__":
    main()
