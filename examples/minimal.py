"""Answer one question with a converted checkpoint.

python examples/minimal.py CHECKPOINT [PROMPT]
"""

import sys

from mlx_diffgemma import generate, load

model, tokenizer = load(sys.argv[1])
prompt = sys.argv[2] if len(sys.argv) > 2 else "Why is the sky blue?"
# Chat messages are rendered with the checkpoint's chat template.
messages = [{"role": "user", "content": prompt}]
print(generate(model, tokenizer, messages, seed=0))
