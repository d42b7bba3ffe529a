"""Watch the canvas being denoised: one line per denoising step, then the committed text.

Each step shows which canvas positions it accepted (#) and which it renoised (.),
next to the argmax draft of the whole canvas.

    python examples/stream_drafts.py CHECKPOINT [PROMPT] [--max-tokens N] [--steps N]
"""

import argparse

from mlx_diffgemma import load, stream_generate

parser = argparse.ArgumentParser(description="Print every denoising step.")
parser.add_argument("checkpoint", help="converted checkpoint folder or Hugging Face repo id")
parser.add_argument("prompt", nargs="?", default="Write a haiku about the sea.")
parser.add_argument("--max-tokens", type=int, default=32, help="output tokens at most")
parser.add_argument("--steps", type=int, default=8, help="denoising steps per canvas at most")
args = parser.parse_args()

model, tokenizer = load(args.checkpoint)
messages = [{"role": "user", "content": args.prompt}]

stream = stream_generate(
    model,
    tokenizer,
    messages,
    max_tokens=args.max_tokens,
    max_denoising_steps=args.steps,
    seed=0,
    drafts=True,
)
for r in stream:
    if r.kind == "draft":
        marks = "".join("#" if a else "." for a in r.draft_accepted)
        draft = r.draft_text.replace("\n", " ")[:60]
        # flush: each step shows as it is computed, also when stdout is a pipe.
        print(f"canvas {r.block_index} step {r.step:2d} {marks[:64]} {draft!r}", flush=True)
    else:
        text = r.thinking + r.text
        print(f"canvas {r.block_index} committed after {r.step} steps: {text!r}", flush=True)
print(
    f"finish: {r.finish_reason}, {r.generation_tps:.1f} tokens/s, "
    f"{r.tokens_per_forward:.2f} tokens per forward"
)
