"""Watch the canvas being denoised: one line per denoising step, then the committed text.

Each step shows which canvas positions it accepted (#) and which it renoised (.),
next to the argmax draft of the whole canvas.

    python examples/stream_drafts.py CHECKPOINT [PROMPT]
"""

import sys

from mlx_diffgemma import load, stream_generate

model, tokenizer = load(sys.argv[1])
prompt = sys.argv[2] if len(sys.argv) > 2 else "Write a haiku about the sea."
messages = [{"role": "user", "content": prompt}]

for r in stream_generate(model, tokenizer, messages, seed=0, drafts=True):
    if r.kind == "draft":
        marks = "".join("#" if a else "." for a in r.draft_accepted)
        draft = r.draft_text.replace("\n", " ")[:60]
        print(f"canvas {r.block_index} step {r.step:2d} {marks[:64]} {draft!r}")
    else:
        print(f"canvas {r.block_index} committed after {r.step} steps: {r.thinking + r.text!r}")
print(
    f"finish: {r.finish_reason}, {r.generation_tps:.1f} tokens/s, "
    f"{r.tokens_per_forward:.2f} tokens per forward"
)
