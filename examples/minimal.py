"""Answer one question with a converted checkpoint.

    python examples/minimal.py CHECKPOINT [PROMPT] [--max-tokens N] [--steps N]

The defaults are small so that a first run answers quickly; raise them for longer or
more carefully denoised answers (the checkpoint's own defaults: 256 tokens, 48 steps).
"""

import argparse

from mlx_diffgemma import generate, load

parser = argparse.ArgumentParser(description="Answer one question.")
parser.add_argument("checkpoint", help="converted checkpoint folder or Hugging Face repo id")
parser.add_argument("prompt", nargs="?", default="Why is the sky blue?")
parser.add_argument("--max-tokens", type=int, default=64, help="output tokens at most")
parser.add_argument("--steps", type=int, default=16, help="denoising steps per canvas at most")
args = parser.parse_args()

model, tokenizer = load(args.checkpoint)
# Chat messages are rendered with the checkpoint's chat template.
messages = [{"role": "user", "content": args.prompt}]
# verbose: print each canvas's text as it is committed, then the statistics.
generate(
    model,
    tokenizer,
    messages,
    max_tokens=args.max_tokens,
    max_denoising_steps=args.steps,
    seed=0,
    verbose=True,
)
