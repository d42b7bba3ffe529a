"""What the commands share: the model and sampler options, one-line errors, Ctrl-C.

Unset sampler flags stay None, so the precedence of `config.py` applies
(flag > generation_config.json > transformers' defaults).
"""

import sys
from typing import Dict, Optional

import click

# 4-bit mixed build (15.4 GB): fits a 24 GB Mac.
# The bf16 original is google/diffusiongemma-26B-A4B-it.
DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"
# mx.random.key takes an unsigned 32-bit seed.
MAX_SEED = 2**32 - 1
# A shell's exit status after SIGINT.
INTERRUPTED = 130

# Sampler flag -> DiffusionConfig field.
SAMPLER_FLAGS = {
    "--steps": "max_denoising_steps",
    "--entropy-bound": "entropy_bound",
    "--t-min": "t_min",
    "--t-max": "t_max",
    "--stability-threshold": "stability_threshold",
    "--confidence-threshold": "confidence_threshold",
    "--mode": "mode",
    "--top-k": "top_k",
    "--self-conditioning-top-k": "self_conditioning_top_k",
    "--commit-rule": "commit_rule",
    "--commit-threshold": "commit_threshold",
    "--monotone-commit": "monotone_commit",
    "--commit-argmax": "commit_argmax",
    "--commit-stable": "commit_stable",
    "--canvas-shrink": "canvas_shrink",
    "--eos-tail-cut": "eos_tail_cut",
    "--compact": "compact",
    "--repair": "repair",
    "--reopen": "reopen",
}

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

model_option = click.option(
    "--model",
    "model_path",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Checkpoint folder (converted or transformers layout) or Hugging Face repo id.",
)

adapter_option = click.option(
    "--adapter-path",
    default=None,
    help="A fine-tuned adapter folder (mlx_diffgemma.lora's or a PEFT LoRA) to apply.",
)


class _Seed(click.IntRange):
    name = "integer"  # "'x' is not a valid integer", not "... a valid integer range"


seed_option = click.option(
    "--seed",
    type=_Seed(0, MAX_SEED),
    default=None,
    help="Seed of all random draws, 0 to 2**32-1 [default: random].",
)


def sampler_options(command):
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
        click.option(
            "--mode",
            type=click.Choice(["exact", "fast"]),
            default=None,
            help="exact: transformers' sampler; fast: an approximation (the settings below "
            "default to top-k 64, gathered self-conditioning, canvas shrink 64).  "
            "[default: exact]",
        ),
        click.option(
            "--top-k",
            type=click.IntRange(min=0),
            default=None,
            help="Fast mode: sample from each position's k most likely tokens (0: all).",
        ),
        click.option(
            "--self-conditioning-top-k",
            type=click.IntRange(min=0),
            default=None,
            help="Fast mode: self-condition on the k most likely tokens' embeddings (0: all).",
        ),
        click.option(
            "--commit-rule",
            type=click.Choice(["entropy_bound", "confidence"]),
            default=None,
            help="Fast mode: accept by entropy bound, or max probability >= --commit-threshold.",
        ),
        click.option(
            "--commit-threshold",
            type=click.FloatRange(min=0, max=1, min_open=True),
            default=None,
            help="Fast mode: the confidence rule's threshold.  [default: 0.9]",
        ),
        click.option(
            "--monotone-commit/--no-monotone-commit",
            default=None,
            help="Fast mode: accepted tokens stay fixed for the rest of the canvas.",
        ),
        click.option(
            "--commit-argmax/--no-commit-argmax",
            default=None,
            help="Fast mode (with monotone commit): commit the argmax, not the sample.",
        ),
        click.option(
            "--commit-stable/--no-commit-stable",
            default=None,
            help="Fast mode (with monotone commit): commit only tokens whose argmax did not "
            "change since the previous step.",
        ),
        click.option(
            "--canvas-shrink",
            type=click.IntRange(min=0),
            default=None,
            help="Fast mode: a last canvas past --max-tokens has max(N, tokens left) "
            "positions (0: off).",
        ),
        click.option(
            "--eos-tail-cut/--no-eos-tail-cut",
            default=None,
            help="Fast mode (with monotone commit): positions after a committed EOS are "
            "fixed at pad.",
        ),
        click.option(
            "--compact/--no-compact",
            default=None,
            help="Fast mode (with monotone commit and both top-k): forward only the "
            "undecided positions; decided ones keep their last K/V.",
        ),
        click.option(
            "--repair",
            type=click.IntRange(min=0),
            default=None,
            help="Fast mode: this many extra full forwards after a canvas stops; the last "
            "one's argmax is the output (0: off).",
        ),
        click.option(
            "--reopen/--no-reopen",
            default=None,
            help="Fast mode (with monotone commit and --repair): a repair pass reopens the "
            "committed tokens it changes and denoising goes on.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def sampler_flags(params: Dict[str, Optional[float]]) -> Dict[str, Optional[float]]:
    """The sampler flags' values by flag name, from the command's keyword arguments."""
    return {f: params[f.lstrip("-").replace("-", "_")] for f in SAMPLER_FLAGS}


def decode_text(data: bytes, where: str) -> str:
    """`data` as UTF-8 text, or a one-line ClickException naming `where` and the position."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise click.ClickException(
            f"{where} is not UTF-8 text: byte 0x{data[e.start]:02x} at position {e.start}; "
            "convert it to UTF-8 (e.g. iconv -t UTF-8)."
        ) from None


def read_stdin() -> str:
    """All of stdin as UTF-8 text (a one-line error otherwise)."""
    return decode_text(sys.stdin.buffer.read(), "stdin")


def read_file(path: str) -> str:
    """A file as UTF-8 text (a one-line error otherwise)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise click.ClickException(f"cannot read {path}: {e.strerror}.") from None
    return decode_text(data, path)


def one_line(e: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def interrupted_line() -> int:
    """Print the line Ctrl-C ends a command with; the exit status to end it with (argparse
    entry points, which end with `sys.exit(interrupted_line())`)."""
    print(("\n" if sys.stderr.isatty() else "") + "Interrupted.", file=sys.stderr)
    return INTERRUPTED


def interrupted(code: int = INTERRUPTED):
    """End the command after Ctrl-C: one line, no traceback, exit status 130."""
    # On a terminal, start a line of its own after the echoed ^C.
    click.echo(("\n" if sys.stderr.isatty() else "") + "Interrupted.", err=True)
    raise click.exceptions.Exit(code)


def passthrough_command(name: str, main, short_help: str) -> click.Command:
    """A command that hands every argument (--help included) to `main(argv)`: for the
    commands that keep mlx-lm's argparse flags (lora, fuse, serve)."""

    @click.command(
        name=name,
        help=short_help,
        context_settings={"ignore_unknown_options": True, "help_option_names": []},
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args):
        sys.argv[0] = f"mlx_diffgemma {name}"  # the program name `--help` shows
        main(list(args))

    return command


def prog_name(default: str) -> str:
    """The program name for an argparse command: `mlx_diffgemma NAME` when run as a
    subcommand (see `passthrough_command`), else `default` (`python -m ...`)."""
    return sys.argv[0] if sys.argv and sys.argv[0].startswith("mlx_diffgemma ") else default
