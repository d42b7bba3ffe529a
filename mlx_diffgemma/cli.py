"""Command line: `mlx_diffgemma generate|infill|convert|lora|distill|fuse|serve ...` (also `python -m mlx_diffgemma`).

This module only assembles the commands; each lives beside the module it drives
(`generate.py`, `infill.py`, `convert.py`, `server/app.py`) and is imported only when it runs, so
`--help` answers at once and a Ctrl-C while MLX imports ends as cleanly as one later.
"""

import importlib
from typing import List, Optional

import click

from .options import CONTEXT_SETTINGS, interrupted

# Command name -> (module, command object, the command's one-line help).
COMMANDS = {
    "generate": ("generate", "generate_command", "Generate text with DiffusionGemma."),
    "infill": (
        "infill",
        "infill_command",
        "Fill the holes of a text; the text around them is kept byte for byte.",
    ),
    "convert": (
        "convert",
        "convert_command",
        "Convert a DiffusionGemma checkpoint to MLX (the vision tower kept when present).",
    ),
    "lora": (
        "lora",
        "lora_command",
        "Fine-tune with DiffusionGemma's objective (LoRA, DoRA or full).",
    ),
    "distill": (
        "distill",
        "distill_command",
        "Distill a model into one that needs few denoising steps per canvas.",
    ),
    "fuse": ("fuse", "fuse_command", "Fuse an adapter into the model and save it."),
    "serve": (
        "server.app",
        "serve_command",
        "Serve the model over OpenAI- and Anthropic-compatible HTTP APIs.",
    ),
}


class _Commands(click.Group):
    """A group whose commands are imported when they run, not when the group is listed."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, command, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"{__package__}.{module}"), command)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, _, short) in COMMANDS.items()])

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # while a command's module imports
            interrupted()


@click.group(cls=_Commands, context_settings=CONTEXT_SETTINGS)
def cli():
    """DiffusionGemma (block text diffusion) on MLX."""


def main(args: Optional[List[str]] = None) -> None:
    """Console entry point `mlx_diffgemma`."""
    cli.main(args=args, prog_name="mlx_diffgemma")


if __name__ == "__main__":
    main()
