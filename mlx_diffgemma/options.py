"""What the commands share: the model and sampler options, one-line errors, Ctrl-C.

Unset sampler flags stay None, so the precedence of `diffusion/config.py` applies
(flag > generation_config.json > transformers' defaults).
"""

import dataclasses
import sys
from typing import Dict, Optional

import click

from .diffusion.config import COMMIT_RULES, FAST_SETTINGS, FastSettings

# 4-bit mixed build (15.4 GB): fits a 24 GB Mac.
# The bf16 original is google/diffusiongemma-26B-A4B-it.
DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"
# mx.random.key takes an unsigned 32-bit seed.
MAX_SEED = 2**32 - 1
# A shell's exit status after SIGINT.
INTERRUPTED = 130

# Sampler flag -> DiffusionConfig field (fast mode's, from FastSettings' table, follow).
SAMPLER_FLAGS = {
    "--steps": "max_denoising_steps",
    "--entropy-bound": "entropy_bound",
    "--t-min": "t_min",
    "--t-max": "t_max",
    "--stability-threshold": "stability_threshold",
    "--confidence-threshold": "confidence_threshold",
    "--mode": "mode",
    **{"--" + name.replace("_", "-"): name for name in FAST_SETTINGS},
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
    ]
    options += [_fast_option(f) for f in dataclasses.fields(FastSettings)]
    for option in reversed(options):
        command = option(command)
    return command


_FAST_TYPES = {
    "count": click.IntRange(min=0),
    "rule": click.Choice(COMMIT_RULES),
    "probability": click.FloatRange(min=0, max=1, min_open=True),
}


def _fast_option(f: dataclasses.Field):
    """The flag of one FastSettings field: its name, kind, help and needs from the table."""
    flag = "--" + f.name.replace("_", "-")
    needs = [n for names, _ in f.metadata["needs"] for n in names]
    where = f" (with {' and '.join(n.replace('_', '-') for n in needs)})" if needs else ""
    default = f.default if f.metadata["kind"] != "bool" else ("on" if f.default else "off")
    text = f"Fast mode{where}: {f.metadata['help']}  [fast default: {default}]"
    if f.metadata["kind"] == "bool":
        return click.option(f"{flag}/--no-{flag[2:]}", default=None, help=text)
    return click.option(flag, type=_FAST_TYPES[f.metadata["kind"]], default=None, help=text)


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
    """Print the line Ctrl-C ends a command with; the exit status to end it with (the
    commands that end with `sys.exit(interrupted_line())`: lora, distill, fuse)."""
    print(("\n" if sys.stderr.isatty() else "") + "Interrupted.", file=sys.stderr)
    return INTERRUPTED


def interrupted(code: int = INTERRUPTED):
    """End the command after Ctrl-C: one line, no traceback, exit status 130."""
    # On a terminal, start a line of its own after the echoed ^C.
    click.echo(("\n" if sys.stderr.isatty() else "") + "Interrupted.", err=True)
    raise click.exceptions.Exit(code)


def run_command(command: click.Command, argv, prog: str) -> None:
    """Run a click command as `python -m` does (program name `prog`); return on success
    (click's standalone mode exits with status 0), so Python callers may go on."""
    try:
        command.main(args=argv, prog_name=prog)
    except SystemExit as e:
        if e.code:
            raise
